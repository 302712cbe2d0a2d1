"""Shared fixtures: compose configs with Hydra's compose API, run the real CLI in a subprocess."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra

# (registers each strategy's schema, which conf/strategy/*.yaml use)
import recompute_lab.strategies  # noqa: F401
from recompute_lab.config import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Every results.json a test writes (in this process or a CLI subprocess) is checked against the JSON
# Schema.
os.environ["RECOMPUTE_LAB_VALIDATE_RECORDS"] = "1"

# A developer's machine settings (conf/local/default.yaml, git-ignored) must not change what the
# tests run.
LOCAL_OFF = ["~local"] if (Path(CONF_DIR) / "local" / "default.yaml").exists() else []
HYDRA_APPS = (
    "recompute_lab.train",
    "recompute_lab.estimate",
    "recompute_lab.cli.train",
    "recompute_lab.cli.estimate",
    "recompute_lab.plan",
    "recompute_lab.cli.plan",
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cover(*argnames): a parametrized product whose fast run keeps only the cases "
        "needed for every value of each named argument to appear once; the rest run with -m slow",
    )


@pytest.hookimpl(tryfirst=True)  # before -m 'not slow' deselects
def pytest_collection_modifyitems(config, items):
    """Thin the products marked ``cover``: each value of each named argument appears in one fast
    case (cases taken
    greedily in a fixed pseudo-random order, so values pair differently across axes); the full
    product is
    ``-m slow``. E.g. 9 strategies x 4 precisions -> 9 fast cases, each precision among them."""
    seen: dict[str, set] = {}
    for item in sorted(items, key=lambda it: hashlib.md5(it.nodeid.encode()).hexdigest()):
        marker = item.get_closest_marker("cover")
        if marker is None or not hasattr(item, "callspec"):
            continue
        names = marker.args or tuple(item.callspec.params)
        pairs = {
            (n, repr(item.callspec.params[n])) for n in names
        }  # repr: values may be lists of overrides
        covered = seen.setdefault(item.nodeid.split("[")[0], set())
        if pairs <= covered:
            item.add_marker(pytest.mark.slow)
        covered |= pairs


@pytest.fixture(autouse=True, scope="session")
def machine_cache_in_tmp(tmp_path_factory):
    """Per-machine measurements (the CPU peak FLOP/s) go to a temporary folder, never ~/.cache, in
    every test and
    every CLI subprocess a test starts."""
    from recompute_lab.measure.hardware import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("machine_cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


def one_thread_fixture():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two fighting other
    processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# compose_config's compositions: (overrides, the ConfigStore's nodes) -> (config, those nodes).
# A Hydra compose takes ~0.2 s and the suite composes the same overrides many times; a deep copy
# takes ~5 ms. The key holds the ConfigStore's node ids, since a test may store a strategy schema
# of its own (the value keeps those nodes alive, so no id is reused while its entry exists).
_COMPOSED: dict = {}


def _config_store_nodes(repo: dict) -> list:
    nodes = []
    for _, v in sorted(repo.items()):
        nodes += _config_store_nodes(v) if isinstance(v, dict) else [v]
    return nodes


def compose_config(overrides: list[str] | tuple[str, ...] = ()):
    """The composed (not yet validated) config for ``overrides``, as the CLI would see it (a fresh
    copy each call: callers may change it)."""
    GlobalHydra.instance().clear()
    nodes = _config_store_nodes(ConfigStore.instance().repo)
    key = (tuple(overrides), tuple(map(id, nodes)))
    if key not in _COMPOSED:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, *LOCAL_OFF])
        # the first compose registers Hydra's launcher plugins: key on the store as it is now
        key = (key[0], tuple(map(id, _config_store_nodes(ConfigStore.instance().repo))))
        _COMPOSED[key] = (cfg, _config_store_nodes(ConfigStore.instance().repo))
    return copy.deepcopy(_COMPOSED[key][0])


@functools.lru_cache(maxsize=None)
def cached_compose(*overrides: str):
    """compose_config memoised per override tuple (treat the result as read-only)."""
    return compose_config(list(overrides))


@pytest.fixture
def cfg_of():
    yield compose_config
    GlobalHydra.instance().clear()


# One warm-start process per test worker (tests/cli_zygote.py): a cold CLI start spends 3-7 s here
# importing torch, torch._dynamo and Hydra. RECOMPUTE_LAB_TEST_COLD=1 runs every command cold.
_ZYGOTE: list = []


def _warm_start(env: dict):
    """The worker's zygote when ``env`` lets a fork stand for a cold start, else None."""
    from cli_zygote import Zygote

    if os.environ.get("RECOMPUTE_LAB_TEST_COLD") == "1" or not hasattr(os, "fork"):
        return None  # asked for, or no fork (Windows): every command cold
    if not _ZYGOTE or not _ZYGOTE[0].alive():
        _ZYGOTE[:] = [Zygote(_cli_env())]
    return _ZYGOTE[0] if _ZYGOTE[0].fits(env) else None


def _cli_env(env: dict | None = None) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **(env or {})}


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: float = 300,
    module: str = "recompute_lab.train",
    env: dict | None = None,
    cold: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would, in ``cwd``: in a child forked from the
    worker's warm start (the same process semantics, without re-importing torch), or with
    ``cold=True`` (or an environment the fork cannot honour) in a fresh interpreter."""
    full_env = _cli_env(env)
    args = [*args, *LOCAL_OFF] if module in HYDRA_APPS else list(args)
    zygote = None if cold else _warm_start(full_env)
    if zygote is not None:
        return zygote.run(module, args, cwd, full_env, timeout)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def load_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# Tests' runs: no W&B, no progress bar; FAST also skips the paired time overhead (38 extra steps,
# ~40% of a tiny
# run), which tests/integration/test_overhead.py and the analysis tests keep with FAST_TIMED.
FAST_TIMED = ["logger=none", "trainer.progress=false"]
FAST = [*FAST_TIMED, "trainer.overhead.enabled=false"]


def retained_bytes(forward, exclude=()) -> tuple[int, object]:
    """An independent count of what backward keeps: bytes of the storages ``forward()`` made that
    are still alive
    once it returns (weak references only; storages of the ``exclude`` tensors, e.g. parameters,
    buffers, inputs
    and the output, left out; a reused address counts once among live storages). Returns (bytes,
    output)."""
    import gc

    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class NewStorages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen += [
                (
                    StorageWeakRef(t.untyped_storage()),
                    t.untyped_storage().data_ptr(),
                    t.untyped_storage().nbytes(),
                )
                for t in tree_leaves(out)
                if isinstance(t, torch.Tensor)
            ]
            return out

    gc.freeze()  # only this forward's objects are collected below (fast)
    try:
        with NewStorages() as mode:
            out = forward()
        gc.collect()
    finally:
        gc.unfreeze()
    skip = {
        t.untyped_storage().data_ptr()
        for t in (*exclude, *tree_leaves(out))
        if isinstance(t, torch.Tensor)
    }
    return sum(
        {p: n for ref, p, n in mode.seen if not ref.expired() and p not in skip}.values()
    ), out

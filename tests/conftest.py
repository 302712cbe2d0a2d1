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
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

# (registers each strategy's schema, which conf/strategy/*.yaml use)
import recompute_lab.strategies  # noqa: F401
from recompute_lab.config import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Every results.json a test writes (in this process or a CLI subprocess) is checked against the JSON
# Schema.
os.environ["RECOMPUTE_LAB_VALIDATE_RECORDS"] = "1"
# Analyses draw their figures as PNG only (each PDF is drawn a second time, with its own layout pass
# and font subsetting); the tests about the PDFs ask for them (tests/integration/test_analysis.py).
os.environ["RECOMPUTE_LAB_FIGURE_FORMATS"] = "png"

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
# Hydra's overrides parser and config repository, made once (group_exists reads the conf folder
# and the ConfigStore as they are when asked).
_HYDRA: dict = {}


def _config_store_nodes(repo: dict) -> list:
    nodes = []
    for _, v in sorted(repo.items()):
        nodes += _config_store_nodes(v) if isinstance(v, dict) else [v]
    return nodes


def _store_key() -> tuple:
    return tuple(map(id, _config_store_nodes(ConfigStore.instance().repo)))


def hydra_compose(overrides) -> DictConfig:
    """Hydra's own compose of the primary config with ``overrides`` (uncached; ~0.2 s)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            if "repository" not in _HYDRA:
                _HYDRA["repository"] = GlobalHydra.instance().hydra.config_loader.repository
            return compose(config_name="config", overrides=[*overrides, *LOCAL_OFF])
    finally:
        GlobalHydra.instance().clear()


def _split_overrides(overrides) -> tuple[list[str], list] | None:
    """Hydra's own split of ``overrides``: (the group overrides, which choose the files the
    defaults list composes, as strings; the parsed config overrides, which Hydra applies to the
    composed config in order afterwards). A config override is one whose key is not a config group
    of the repository, or whose value is a dict (defaults_list.Overrides). None for what only a
    whole compose stands for: sweeps, the hydra node, a package (@) override."""
    if "parser" not in _HYDRA:
        _HYDRA["parser"] = OverridesParser.create()
    if "repository" not in _HYDRA:
        hydra_compose([])
    groups, configs = [], []
    for line, o in zip(overrides, _HYDRA["parser"].parse_overrides(overrides=list(overrides))):
        if o.is_sweep_override() or o.is_hydra_override() or o.package is not None:
            return None
        if _HYDRA["repository"].group_exists(o.key_or_group) and not isinstance(o.value(), dict):
            groups.append(line)
        else:
            configs.append(o)
    return groups, configs


def _composed(overrides: tuple) -> DictConfig:
    """The cached composition of ``overrides`` (the cache's own object: copy before changing it).

    Overrides that only set values are applied, as Hydra applies them (its own
    ``_apply_overrides_to_config`` on the struct-mode config), to the cached composition of the
    group overrides alone, so a test that varies a value pays a deep copy, not a compose.
    tests/unit/test_compose_cache.py holds this equal to Hydra's whole compose. Whatever the
    shortcut cannot stand for, or refuses, goes to Hydra's compose, which gives its own answer or
    error."""
    key = (overrides, _store_key())
    if key in _COMPOSED:
        return _COMPOSED[key][0]
    try:
        split = _split_overrides(overrides)
    except Exception:  # noqa: BLE001 - a malformed override: Hydra's compose says what is wrong
        split = None
    cfg = None
    if split is not None and split[1]:
        cfg = copy.deepcopy(_composed(tuple(split[0])))
        try:
            ConfigLoaderImpl._apply_overrides_to_config(split[1], cfg)
        except Exception:  # noqa: BLE001 - Hydra's compose below raises the error a user sees
            cfg = None
    if cfg is None:
        cfg = hydra_compose(overrides)
    # the first compose registers Hydra's launcher plugins: key on the store as it is now
    _COMPOSED[(overrides, _store_key())] = (cfg, _config_store_nodes(ConfigStore.instance().repo))
    return cfg


def compose_config(overrides: list[str] | tuple[str, ...] = ()):
    """The composed (not yet validated) config for ``overrides``, as the CLI would see it (a fresh
    copy each call: callers may change it)."""
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.lru_cache(maxsize=None)
def cached_compose(*overrides: str):
    """compose_config memoised per override tuple (treat the result as read-only)."""
    return compose_config(list(overrides))


@pytest.fixture
def cfg_of():
    yield compose_config
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _older_objects_frozen():
    """Keep what the worker held before this test (torch, Hydra, transformers, the collected test
    modules, caches: millions of objects) out of the cyclic collector's sight. Every full
    collection the product makes (engine.run's release_host_memory, the saved-tensor counts) then
    scans what this test made, not those: ~0.3 s per collection in a worker otherwise. What earlier
    tests left is collected first (a scan of the last test's objects only), the survivors frozen."""
    import gc

    from recompute_lab.measure.memory import freeze_older_objects

    gc.collect()
    freeze_older_objects()
    yield


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


def _run_python(
    module: str | None, script: str | None, args, cwd, timeout, env, cold
) -> subprocess.CompletedProcess:
    """``python -m module args`` or ``python script args`` in ``cwd``: forked from the worker's warm
    start where the environment allows (and not ``cold``), else in a fresh interpreter."""
    full_env = _cli_env(env)
    zygote = None if cold else _warm_start(full_env)
    if zygote is not None:
        return zygote.run(module, list(args), cwd, full_env, timeout, script=script)
    return subprocess.run(
        [sys.executable, *([script] if script else ["-m", module]), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


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
    args = [*args, *LOCAL_OFF] if module in HYDRA_APPS else list(args)
    return _run_python(module, None, args, cwd, timeout, env, cold)


def run_script(
    path: Path | str,
    args: list[str],
    cwd: Path,
    timeout: float = 300,
    env: dict | None = None,
    cold: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``python path args`` (an experiments/ script) as run_cli runs a module."""
    return _run_python(None, str(path), args, cwd, timeout, env, cold)


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

    from recompute_lab.measure.memory import older_objects_frozen

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

    # only this forward's objects are collected below (fast); the gc scope is shared with the
    # product, the counting is not
    with older_objects_frozen():
        with NewStorages() as mode:
            out = forward()
        gc.collect()
    skip = {
        t.untyped_storage().data_ptr()
        for t in (*exclude, *tree_leaves(out))
        if isinstance(t, torch.Tensor)
    }
    return sum(
        {p: n for ref, p, n in mode.seen if not ref.expired() and p not in skip}.values()
    ), out

"""Checkpoint hardening: safe loading, integrity, refusal of every malformed file, atomic writes
(issue 15).

Each attack test first shows that the attack is live (the crafted file does run code, the flipped
file does
load under plain torch.load), so that it fails if the defence is missing rather than if the attack
is broken.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from recompute_lab.run import checkpoint

from recompute_lab.record import fileio
from recompute_lab.config import ConfigError
from recompute_lab.model.gpt import build_model
from recompute_lab.model.precision import make_precision
from recompute_lab.config.spec import RunSpec

from conftest import FAST, cached_compose, one_thread_fixture

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)

STEPS = 4
OVERRIDES = (*FAST, f"trainer.steps={STEPS}", "model.dropout=0.1")  # dropout: the RNG state matters


def _cfg(*extra: str):
    return RunSpec.of(cached_compose(*OVERRIDES, *extra))


def _schedule(step: int) -> float:
    return 1.0 / (step + 1)


def _make(cfg, seed: int):
    torch.manual_seed(seed)
    policy = make_precision(cfg.precision)
    model = build_model(cfg.model, "cpu", policy.param_dtype)
    optimizer = policy.build_optimizer(model, cfg.optimizer)
    return model, optimizer, LambdaLR(optimizer, _schedule)


def _train_step(model, optimizer, scheduler, cfg, batch_seed: int) -> float:
    idx = torch.randint(
        0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(batch_seed)
    )
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def _trained_checkpoint(path, cfg, steps: int = 2):
    """Train ``steps`` steps, save; return (model, optimizer, scheduler) as saved."""
    model, optimizer, scheduler = _make(cfg, seed=0)
    history = [_train_step(model, optimizer, scheduler, cfg, s) for s in range(steps)]
    checkpoint.save(
        path,
        cfg=cfg,
        step=steps,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        history=history,
        step_s=[0.01] * steps,
    )
    return model, optimizer, scheduler


def _write_v2(path, state, *, version=2, digest=None, drop=()):
    """A version-2 file built independently of checkpoint.save: container around torch.save(state)
    bytes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    container = {
        "format": checkpoint.FORMAT,
        "version": version,
        "sha256": digest or hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }
    torch.save({k: v for k, v in container.items() if k not in drop}, path)


def _inner(path) -> dict:
    """The state inside a version-2 file, read the way an inspector would (weights_only, no
    checks)."""
    container = torch.load(path, weights_only=True)
    return torch.load(io.BytesIO(container["payload"].numpy().tobytes()), weights_only=True)


def _snapshot(model, optimizer, scheduler) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {
            i: {k: v.clone() for k, v in s.items()}
            for i, s in optimizer.state_dict()["state"].items()
        },
        "groups": [dict(g) for g in optimizer.state_dict()["param_groups"]],
        "scheduler": dict(scheduler.state_dict()),
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype and torch.equal(
            a["model"][k], b["model"][k]
        ), k
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for i in a["optimizer"]:
        assert a["optimizer"][i].keys() == b["optimizer"][i].keys()
        for k in a["optimizer"][i]:
            x, y = a["optimizer"][i][k], b["optimizer"][i][k]
            assert x.dtype == y.dtype and torch.equal(x, y), (i, k)
    assert a["groups"] == b["groups"] and a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"], b["rng"])


# -- a good checkpoint round-trips -----------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16_master"])
def test_round_trip_restores_everything_and_training_continues_identically(tmp_path, precision):
    cfg = _cfg(f"precision={precision}")
    path = tmp_path / checkpoint.FILENAME
    model, optimizer, scheduler = _trained_checkpoint(path, cfg)
    saved = _snapshot(model, optimizer, scheduler)
    next_loss = _train_step(
        model, optimizer, scheduler, cfg, batch_seed=2
    )  # dropout draws from the RNG

    torch.manual_seed(12345)  # a different RNG state, to be replaced by the saved one
    fresh = _make(cfg, seed=1)
    assert not torch.equal(
        fresh[0].state_dict()["tok_emb.weight"], saved["model"]["tok_emb.weight"]
    )
    state = checkpoint.load(path, cfg)
    assert state["step"] == 2 and len(state["history"]) == 2 and state["step_s"] == [0.01, 0.01]
    checkpoint.restore(state, *fresh)
    _assert_same(saved, _snapshot(*fresh))
    if (
        precision == "bf16_master"
    ):  # master weights keep fp32 (Optimizer.load_state_dict would cast to bf16)
        assert all(s["master"].dtype == torch.float32 for s in fresh[1].state.values())
    assert _train_step(*fresh, cfg, batch_seed=2) == next_loss


def test_saved_state_is_plain_and_loads_weights_only(tmp_path):
    cfg = _cfg()
    path = tmp_path / checkpoint.FILENAME
    _trained_checkpoint(path, cfg)
    container = torch.load(
        path, weights_only=True
    )  # raises if anything but tensors and plain data is inside
    assert container["version"] == checkpoint.CHECKPOINT_VERSION == 2
    state = _inner(path)
    assert state["scheduler"]["lr_lambdas"] == [None, None]  # a plain function: not pickled
    assert all(type(v) is float for v in state["history"] + state["step_s"])


def test_save_refuses_state_that_weights_only_could_not_load(tmp_path):
    cfg = _cfg()
    model, optimizer, _ = _make(cfg, seed=0)

    # a callable object: LambdaLR stores its __dict__, here holding a non-plain object
    class Schedule:
        def __init__(self):
            self.helper = object()

        def __call__(self, step):
            return 1.0

    with pytest.raises(TypeError, match=r"lr_lambdas.*builtins.object"):
        checkpoint.save(
            tmp_path / checkpoint.FILENAME,
            cfg=cfg,
            step=0,
            model=model,
            optimizer=optimizer,
            scheduler=LambdaLR(optimizer, [Schedule(), Schedule()]),
            history=[],
            step_s=[],
        )
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


# -- attacks ---------------------------------------------------------------------------------------


class _Touch:
    """Unpickling this creates ``target`` (builtins.open in write mode): stands for arbitrary
    code."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _crafted_files(marker):
    evil = {"version": 2, "model": {"w": torch.zeros(2)}, "x": _Touch(marker)}
    zipped = io.BytesIO()
    torch.save(evil, zipped)
    as_container = io.BytesIO()
    payload = zipped.getvalue()
    torch.save(
        {
            "format": checkpoint.FORMAT,
            "version": 2,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        },
        as_container,
    )
    return {
        "torch_zip": (zipped.getvalue(), zipped.getvalue()),  # a whole crafted checkpoint.pt
        "raw_pickle": (pickle.dumps(evil, protocol=2),) * 2,  # legacy non-zip torch format
        "in_hashed_payload": (as_container.getvalue(), payload),  # right digest, crafted payload
    }


@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle", "in_hashed_payload"])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    file_bytes, live_part = _crafted_files(marker)[kind]
    # The attack is live: unrestricted unpickling runs it.
    if kind == "raw_pickle":
        opened = pickle.loads(live_part)
    else:
        opened = torch.load(io.BytesIO(live_part), weights_only=False)
    opened["x"].close()  # the file object the crafted reduce opened
    assert marker.exists()
    marker.unlink()

    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoint.FILENAME).write_bytes(file_bytes)
    with pytest.raises(ConfigError, match=r"other than tensors and plain data.*Unsupported global"):
        checkpoint.load(checkpoint.locate(str(run), run), _cfg())
    assert not marker.exists()


def test_bit_flip_in_payload_is_refused_before_restore(tmp_path):
    cfg = _cfg()
    path = tmp_path / checkpoint.FILENAME
    _trained_checkpoint(path, cfg)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    path.write_bytes(bytes(data))
    # Without the digest this would go unnoticed: torch's zip reader does not check CRCs, the file
    # loads fine.
    torch.load(path, weights_only=True)
    with pytest.raises(
        ConfigError, match=r"corrupt: the sha256 of its payload is [0-9a-f]{64}, the file records"
    ):
        checkpoint.load(path, cfg)


def test_payload_changed_with_stale_digest_is_refused(tmp_path):
    cfg = _cfg()
    path = tmp_path / checkpoint.FILENAME
    _trained_checkpoint(path, cfg)
    container = torch.load(path, weights_only=True)
    state = _inner(path)
    state["model"]["tok_emb.weight"][0, 0] += 1.0
    _write_v2(path, state, digest=container["sha256"])
    with pytest.raises(ConfigError, match="sha256"):
        checkpoint.load(path, cfg)


def test_truncated_and_garbage_files_are_refused(tmp_path):
    cfg = _cfg()
    path = tmp_path / checkpoint.FILENAME
    _trained_checkpoint(path, cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="unreadable or corrupt"):
        checkpoint.load(path, cfg)
    torch.save([1, 2, 3], path)
    with pytest.raises(ConfigError, match="not a recompute_lab checkpoint"):
        checkpoint.load(path, cfg)
    path.unlink()
    path.mkdir()  # a folder where the file should be: unreadable, still a ConfigError
    with pytest.raises(ConfigError, match="unreadable or corrupt"):
        checkpoint.load(path, cfg)


# -- malformed but well-hashed checkpoints ---------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    """A trained checkpoint's state (inner dict) and a writer for modified versions of it."""
    cfg = _cfg()
    path = tmp_path / checkpoint.FILENAME
    _trained_checkpoint(path, cfg)
    return cfg, path, _inner(path)


def test_old_and_unknown_versions_are_refused(good):
    cfg, path, state = good
    v1 = {**state, "version": 1}
    torch.save(v1, path)  # what version 1 wrote: the bare state, no container, no digest
    with pytest.raises(
        ConfigError, match=r"version 1 \(written by an older recompute_lab.*reads version 2"
    ):
        checkpoint.load(path, cfg)
    _write_v2(path, state, version=3)
    with pytest.raises(ConfigError, match="has version 3; this recompute_lab reads version 2"):
        checkpoint.load(path, cfg)
    _write_v2(path, v1)  # container says 2, the state inside says 1
    with pytest.raises(ConfigError, match="has version 1"):
        checkpoint.load(path, cfg)
    _write_v2(path, {**state, "version": "2"})
    with pytest.raises(ConfigError, match="has version '2'"):
        checkpoint.load(path, cfg)


def test_missing_keys_are_listed(good):
    cfg, path, state = good
    _write_v2(path, {k: v for k, v in state.items() if k not in ("optimizer", "rng")})
    with pytest.raises(ConfigError, match=r"missing keys 'optimizer', 'rng'$"):
        checkpoint.load(path, cfg)
    _write_v2(path, state, drop=("sha256",))
    with pytest.raises(ConfigError, match=r"missing keys 'sha256'"):
        checkpoint.load(path, cfg)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"step": STEPS + 1}, r"'step' is 5, expected an int in 0..4"),
        ({"step": -1}, r"'step' is -1, expected an int in 0..4"),
        ({"step": 2.0}, r"'step' is 2.0, expected an int"),
        ({"step": True}, r"'step' is True, expected an int"),
        ({"history": [1.0]}, r"'history' has 1 entries, expected one per completed step \(2\)"),
        ({"step_s": [0.1, 0.1, 0.1]}, r"'step_s' has 3 entries"),
        ({"history": [1.0, "x"]}, r"'history' holds non-numbers at positions 1"),
        ({"history": (1.0, 2.0)}, r"'history' is a tuple, not a list"),
        ({"step_s": [0.1, torch.tensor(0.1)]}, r"'step_s' holds non-numbers"),
        ({"model": [1, 2]}, r"'model' is not a dict of names to tensors"),
        ({"optimizer": {"state": {}}}, r"'optimizer' is not an optimizer state_dict"),
        ({"rng": {"cpu": torch.zeros(3)}}, r"'rng' is not"),
        ({"fingerprint": "x"}, r"'fingerprint' is not a dict"),
    ],
)
def test_malformed_values_are_refused_by_load(good, change, message):
    cfg, path, state = good
    _write_v2(path, {**state, **change})
    with pytest.raises(ConfigError, match=message):
        checkpoint.load(path, cfg)


def test_config_mismatch_is_refused_as_before(good):
    _, path, _ = good
    with pytest.raises(
        ConfigError, match=r"different configuration; differing keys: model.d_model \(64 -> 32\)"
    ):
        checkpoint.load(path, _cfg("model.d_model=32"))


def _refused_by_restore(cfg, path, state, message):
    """restore() raises ConfigError(message) and leaves model, optimizer, scheduler and RNG as they
    were."""
    _write_v2(path, state)
    loaded = checkpoint.load(path, cfg)
    objs = _make(cfg, seed=1)
    _train_step(
        *objs, cfg, batch_seed=0
    )  # optimizer state exists, so a half-applied restore would show
    before = _snapshot(*objs)
    with pytest.raises(ConfigError, match=message):
        checkpoint.restore(loaded, *objs)
    _assert_same(before, _snapshot(*objs))


def test_model_key_and_shape_problems_are_refused_without_half_applying(good):
    cfg, path, state = good
    sd = dict(state["model"])
    gone = "head.weight"
    del sd[gone]
    sd["blocks.9.extra"] = torch.zeros(1)
    sd["tok_emb.weight"] = sd["tok_emb.weight"][:, :32].clone()
    _refused_by_restore(
        cfg,
        path,
        {**state, "model": sd},
        rf"missing model keys '{gone}'; unexpected model keys 'blocks.9.extra'; "
        r"model shape mismatches: tok_emb.weight \(256, 32\) vs the model's \(256, 64\)",
    )
    sd = {k: (v.double() if k == "tok_emb.weight" else v) for k, v in state["model"].items()}
    _refused_by_restore(
        cfg, path, {**state, "model": sd}, r"model dtype mismatches: tok_emb.weight torch.float64"
    )


def test_optimizer_scheduler_and_rng_problems_are_refused_without_half_applying(good):
    cfg, path, state = good
    opt = {
        **state["optimizer"],
        "state": {i: dict(s) for i, s in state["optimizer"]["state"].items()},
    }
    opt["state"][0]["exp_avg"] = opt["state"][0]["exp_avg"][:1].clone()
    _refused_by_restore(
        cfg, path, {**state, "optimizer": opt}, r"optimizer state shape mismatches: param 0 exp_avg"
    )
    groups = [dict(g) for g in state["optimizer"]["param_groups"]]
    groups[0]["params"] = groups[0]["params"][:-1]
    _refused_by_restore(
        cfg,
        path,
        {**state, "optimizer": {**state["optimizer"], "param_groups": groups}},
        r"optimizer group 0 has \d+ parameters, this run's has \d+",
    )
    groups = [{k: v for k, v in g.items() if k != "lr"} for g in state["optimizer"]["param_groups"]]
    _refused_by_restore(
        cfg,
        path,
        {**state, "optimizer": {**state["optimizer"], "param_groups": groups}},
        r"optimizer group 0 lacks 'lr'",
    )
    opt = {
        **state["optimizer"],
        "state": {**state["optimizer"]["state"], 999: {"step": torch.tensor(1.0)}},
    }
    _refused_by_restore(cfg, path, {**state, "optimizer": opt}, r"unknown parameter ids 999")
    # LRScheduler.load_state_dict is __dict__.update: this would replace scheduler.optimizer.
    _refused_by_restore(
        cfg,
        path,
        {**state, "scheduler": {**state["scheduler"], "optimizer": 0}},
        r"unexpected scheduler keys 'optimizer'",
    )
    sched = {k: v for k, v in state["scheduler"].items() if k != "last_epoch"}
    _refused_by_restore(
        cfg, path, {**state, "scheduler": sched}, r"missing scheduler keys 'last_epoch'"
    )
    _refused_by_restore(
        cfg,
        path,
        {**state, "scheduler": {**state["scheduler"], "base_lrs": [0.1]}},
        r"scheduler base_lrs is not a list of 2 numbers",
    )
    rng = {**state["rng"], "cpu": state["rng"]["cpu"][:100].clone()}
    _refused_by_restore(
        cfg, path, {**state, "rng": rng}, r"CPU RNG state has 100 bytes, expected \d+"
    )


def test_no_raw_exception_for_any_broken_entry(good):
    """Every top-level entry deleted or replaced by junk: load or restore says ConfigError, never
    anything else."""
    cfg, path, state = good
    junk = [None, 0, -3, 1.5, "x", [], {}, [None], {"a": None}, torch.zeros(3)]
    cases = [{k: v for k, v in state.items() if k != key} for key in state]
    cases += [{**state, key: j} for key in state for j in junk]
    objs = _make(cfg, seed=1)
    for case in cases:
        _write_v2(path, case)
        with pytest.raises(ConfigError):
            checkpoint.restore(checkpoint.load(path, cfg), *objs)
    # ... and restore() on its own, handed a state that never went through load(): every entry it
    # applies
    restored = ("model", "optimizer", "scheduler", "rng")
    for case in [c for c in cases if any(c.get(k) is not state[k] for k in restored)]:
        with pytest.raises(ConfigError):
            checkpoint.restore(case, *objs)


# -- atomic writes, stale temps, permissions -------------------------------------------------------


def test_save_removes_stale_temps_and_nothing_else(tmp_path):
    cfg = _cfg()
    stale = [
        ".checkpoint.pt.abc123.tmp",
        ".checkpoint.pt.k3j_x9qa.tmp",
        ".checkpoint.pt.0123456789abcdef.tmp",
    ]
    keep_files = [
        "checkpoint.pt.tmp",
        ".checkpoint.pt.tmp",
        ".checkpoint.pt..tmp",
        ".checkpoint.pt.a.b.tmp",
        ".checkpoint.pt.abc.tmp.bak",
        ".checkpoint.ptX.abc.tmp",
        ".results.json.abc123.tmp",
        "x.checkpoint.pt.abc.tmp",
        "notes.txt",
        ".checkpoint.pt.a-b.tmp",
    ]
    for name in stale + keep_files:
        (tmp_path / name).write_text("leftover")
    (
        tmp_path / ".checkpoint.pt.dir1.tmp"
    ).mkdir()  # a folder with the pattern's name: not ours, kept
    outside = tmp_path.parent / f"{tmp_path.name}-target.txt"
    outside.write_text("precious")
    (tmp_path / ".checkpoint.pt.link1.tmp").symlink_to(
        outside
    )  # a symlink: kept, its target untouched
    _trained_checkpoint(tmp_path / checkpoint.FILENAME, cfg)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        [*keep_files, ".checkpoint.pt.dir1.tmp", ".checkpoint.pt.link1.tmp", "checkpoint.pt"]
    )
    assert all((tmp_path / n).read_text() == "leftover" for n in keep_files)
    assert outside.read_text() == "precious"


def test_remove_stale_temps_on_missing_folder_is_a_no_op(tmp_path):
    assert fileio.remove_stale_temps(tmp_path / "nope", "checkpoint.pt") == []


@pytest.fixture
def umask():
    def set_(mask):
        os.umask(mask)

    before = os.umask(0o022)
    yield set_
    os.umask(before)


def test_files_are_created_with_the_umask_applied(tmp_path, umask):
    cfg = _cfg()
    umask(0o022)
    _trained_checkpoint(tmp_path / checkpoint.FILENAME, cfg)
    fileio.atomic_write_text(tmp_path / "a.txt", "a")
    fileio.atomic_write_bytes(tmp_path / "b.bin", b"b")
    for name in (checkpoint.FILENAME, "a.txt", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    umask(0o077)  # the mode follows the umask, it is not a fixed 0644
    fileio.atomic_write_text(tmp_path / "c.txt", "c")
    assert stat.S_IMODE((tmp_path / "c.txt").stat().st_mode) == 0o600
    umask(0o002)
    fileio.atomic_write_text(
        tmp_path / "a.txt", "again"
    )  # a replaced file gets the new temp file's mode
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o664


def test_atomic_writes_fsync_and_replace(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "out.txt"
    target.write_text("old")
    fileio.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    if os.path.exists(
        "/proc/self/fd"
    ):  # the temp file (its name then) and the folder were both fsync'ed
        assert len(synced) == 2 and fileio.temp_name_pattern("out.txt").fullmatch(
            os.path.basename(synced[0])
        )
        assert synced[1] == str(tmp_path)
    synced.clear()
    with fileio.atomic_path(tmp_path / "lib.pt") as tmp:
        assert fileio.temp_name_pattern("lib.pt").fullmatch(tmp.name) and tmp.parent == tmp_path
        torch.save({"a": torch.ones(2)}, tmp)
    assert torch.equal(torch.load(tmp_path / "lib.pt", weights_only=True)["a"], torch.ones(2))
    assert len(synced) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.pt", "out.txt"]


def test_failed_write_removes_its_temp_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. a second Ctrl-C mid-save
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt"
    ]

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write_bytes(target, b"new")
    cfg = _cfg()
    model, optimizer, scheduler = _make(cfg, seed=0)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(
            target,
            cfg=cfg,
            step=0,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            history=[],
            step_s=[],
        )
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt"
    ]


@pytest.mark.parametrize(
    "saved, resumed, key",
    [
        ((), ("compile=eager_partition",), r"compile.backend \(off -> aot_eager_decomp_"),
        (("compile=inductor",), (), r"compile.backend \(inductor -> off\)"),
        (
            ("compile=eager_partition",),
            ("compile=eager_partition", "compile.scope=model"),
            r"compile.scope \(block -> model\)",
        ),
    ],
)
def test_compile_settings_are_part_of_the_fingerprint(tmp_path, saved, resumed, key):
    """An eager checkpoint must not resume compiled, nor the other way round (issue 31)."""
    path = tmp_path / checkpoint.FILENAME
    _trained_checkpoint(path, _cfg(*saved), steps=1)
    with pytest.raises(ConfigError, match=rf"different configuration; differing keys: {key}"):
        checkpoint.load(path, _cfg(*resumed))
    assert checkpoint.load(path, _cfg(*saved))["step"] == 1  # the same settings still resume


def test_a_fingerprint_without_compile_is_refused(tmp_path):
    """Written before compile was fingerprinted: eager or compiled cannot be told apart."""
    path = tmp_path / checkpoint.FILENAME
    cfg = _cfg()
    real = checkpoint.fingerprint
    old = lambda c: {k: v for k, v in real(c).items() if k != "compile"}  # noqa: E731
    with pytest.MonkeyPatch.context() as m:
        m.setattr(checkpoint, "fingerprint", old)
        _trained_checkpoint(path, cfg, steps=1)
    with pytest.raises(ConfigError, match=r"differing keys: compile \(None -> "):
        checkpoint.load(path, cfg)

"""Failure paths: divergence, out of memory inside a sweep, interruption + exact resume, bad
checkpoints, fuzzing."""

from __future__ import annotations

import signal
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recompute_lab.run import engine
from recompute_lab.config import ConfigError, validate
from recompute_lab.model.data import Batches
from recompute_lab.model.gpt import GPT
from recompute_lab.model.precision import POLICIES

from conftest import FAST, compose_config, load_results, run_cli


def test_nan_loss_ends_run_as_diverged(tmp_path, monkeypatch):
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        calls["n"] += idx.device.type != "meta"  # the meta replicas that count FLOPs do not train
        out = real_forward(self, idx, targets)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(GPT, "forward", forward)
    # No memory probe: its forwards would take the injected NaN instead of training step 2.
    res = engine.run(compose_config(["trainer.steps=6", "trainer.probe=false", *FAST]), tmp_path)
    assert res["status"] == "diverged" and "step 2" in res["error"]
    assert len(res["loss"]["history"]) == 3
    assert load_results(tmp_path / "results.json")["status"] == "diverged"


def test_stop_on_nan_false_keeps_going(tmp_path, monkeypatch):
    real_forward = GPT.forward
    monkeypatch.setattr(
        GPT,
        "forward",
        lambda self, idx, targets=None: (
            real_forward(self, idx, targets) * (float("nan") if idx.device.type != "meta" else 1.0)
        ),
    )
    res = engine.run(
        compose_config(["trainer.steps=3", "trainer.stop_on_nan=false", *FAST]), tmp_path
    )
    assert res["status"] == "ok" and len(res["loss"]["history"]) == 3


def _interrupt_at(monkeypatch, at_step: int) -> None:
    real_get = Batches.get

    def get(self, step, micro=0):
        if step == at_step and micro == 0:
            signal.raise_signal(
                signal.SIGTERM
            )  # as SLURM preemption would; the handler only sets a flag
        return real_get(self, step, micro)

    monkeypatch.setattr(Batches, "get", get)


@pytest.mark.parametrize("precision", [p for p in ("fp32", "bf16_master") if p in POLICIES])
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, monkeypatch, precision):
    overrides = ["trainer.steps=8", "model.dropout=0.1", f"precision={precision}", *FAST]
    straight = engine.run(compose_config(overrides), tmp_path / "straight")["loss"]["history"]

    with monkeypatch.context() as m:
        _interrupt_at(m, 4)
        first = engine.run(compose_config(overrides), tmp_path / "split")
    assert first["status"] == "interrupted" and "SIGTERM" in first["error"]
    assert first["checkpoint"]["step"] == 5 and (tmp_path / "split" / "checkpoint.pt").is_file()
    assert first["loss"]["history"] == straight[:5]

    resumed = engine.run(compose_config([*overrides, "trainer.resume=true"]), tmp_path / "split")
    assert resumed["status"] == "ok" and resumed["resumed_from"]["step"] == 5
    assert resumed["loss"]["history"] == straight  # bit-identical, dropout included


def test_resume_refuses_missing_corrupt_and_mismatched_checkpoints(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no checkpoint"):
        engine.run(compose_config(["trainer.resume=true", *FAST]), tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt"):
        engine.run(compose_config([f"trainer.resume={bad}", *FAST]), tmp_path / "x")
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        engine.run(compose_config(["trainer.steps=4", *FAST]), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"model.d_model \(64 -> 32\)"):
        engine.run(
            compose_config(
                ["trainer.steps=4", "model.d_model=32", f"trainer.resume={tmp_path / 'a'}", *FAST]
            ),
            tmp_path / "b",
        )
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    state["version"] = 99
    torch.save(state, tmp_path / "a" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="version 99"):
        engine.run(
            compose_config(["trainer.steps=4", f"trainer.resume={tmp_path / 'a'}", *FAST]),
            tmp_path / "c",
        )


def test_oom_in_one_job_of_a_sweep(tmp_path, monkeypatch):
    """A 3-job multirun (Hydra's basic launcher, in-process) where one job runs out of memory."""
    from recompute_lab.cli import train

    real_forward = GPT.forward

    def forward(self, idx, targets=None):
        if self.cfg.n_layer == 2 and idx.device.type != "meta":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"
            )
        return real_forward(self, idx, targets)

    monkeypatch.setattr(GPT, "forward", forward)
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train",
            "-m",
            "model.n_layer=1,2,3",
            "trainer.steps=2",
            "trainer.probe=false",
            *FAST,
            f"hydra.sweep.dir={sweep}",
            "hydra/job_logging=disabled",
            "hydra.callbacks.analyze.enabled=false",  # figures of the sweep: seconds, not read here
        ],
    )
    train.main()
    statuses = {
        load_results(f)["model"]["n_layer"]: load_results(f) for f in sweep.glob("*/results.json")
    }
    assert sorted(statuses) == [1, 2, 3]
    assert [statuses[n]["status"] for n in (1, 2, 3)] == ["ok", "oom", "ok"]
    failure = statuses[2]["failure"]
    assert failure["phase"] == "forward" and failure["step"] == 0 and failure["strategy"] == "none"


def test_sigterm_to_cli_checkpoints_and_resume_finishes(tmp_path):
    import subprocess
    import os

    run_dir = tmp_path / "run"
    args = [
        "trainer.steps=100000",
        "trainer.checkpoint_every=20",
        *FAST,
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "recompute_lab.train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    deadline = time.time() + 180
    while not (run_dir / "checkpoint.pt").is_file() and time.time() < deadline:
        time.sleep(
            0.2
        )  # the first periodic checkpoint: the training loop runs (earlier, setup would just stop)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    res = load_results(run_dir / "results.json")
    assert res["status"] == "interrupted" and "SIGTERM" in res["error"], err
    done = res["checkpoint"]["step"]
    assert done == len(res["loss"]["history"]) and (run_dir / "checkpoint.pt").is_file()
    again = run_cli(
        [
            *args[:-1],
            f"trainer.steps={done + 2}",
            "trainer.resume=true",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    # trainer.steps differs: the checkpoint belongs to another schedule, so resume must refuse,
    # clearly.
    assert again.returncode == 2 and "trainer.steps" in again.stderr


sizes = st.integers(min_value=-2, max_value=96)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n_layer=st.integers(-1, 3),
    d_model=sizes,
    n_head=st.integers(-1, 9),
    d_ff=sizes,
    seq_len=st.integers(-1, 80),
    batch=st.integers(-1, 3),
    kv=st.sampled_from(["null", "1", "2", "3"]),
    attention=st.sampled_from(["sdpa", "eager"]),
    mlp=st.sampled_from(["gelu", "swiglu"]),
    positions=st.sampled_from(["learned", "rope"]),
    dropout=st.sampled_from([0.0, 0.2, 1.0]),
    strategy=st.sampled_from(["none", "full"]),
)
def test_fuzz_every_case_runs_or_explains(
    tmp_path_factory,
    n_layer,
    d_model,
    n_head,
    d_ff,
    seq_len,
    batch,
    kv,
    attention,
    mlp,
    positions,
    dropout,
    strategy,
):
    overrides = [
        f"model.n_layer={n_layer}",
        f"model.d_model={d_model}",
        f"model.n_head={n_head}",
        f"model.d_ff={d_ff}",
        f"data.seq_len={seq_len}",
        f"data.batch_size={batch}",
        f"model.n_kv_head={kv}",
        f"model.attention={attention}",
        f"model.mlp={mlp}",
        f"model.positions={positions}",
        f"model.dropout={dropout}",
        f"+strategy={strategy}",
        "trainer.steps=1",
        "trainer.warmup_steps=0",
        *FAST,
    ]
    cfg = compose_config(overrides)
    try:
        validate(cfg)
    except ConfigError as e:
        assert str(e)  # a readable validation message; nothing ran
        return
    res = engine.run(cfg, tmp_path_factory.mktemp("fuzz"))
    assert res["status"] == "ok", res.get("error")


def test_memory_guard_refuses_before_allocating(tmp_path, monkeypatch):
    built = []
    real_init = GPT.__init__

    def spy(self, cfg):
        real_init(self, cfg)
        built.append(self.tok_emb.weight.device.type)

    monkeypatch.setattr(GPT, "__init__", spy)
    res = engine.run(
        compose_config(["trainer.steps=2", "trainer.max_memory_gb=0.001", *FAST]), tmp_path / "a"
    )
    assert res["status"] == "oom" and "exceeds trainer.max_memory_gb=0.001" in res["error"]
    assert (
        built == []
    )  # refused on the analytic model state (1.9 MB > 1 MB) before anything was built
    guard = res["memory"]["guard"]
    assert guard["predicted_model_state_bytes"] > 0.001e9 and "predicted_peak_bytes" not in guard
    # A cap above the model state but below the step's peak: refused on the meta replica's predicted
    # peak.
    cap = (guard["predicted_model_state_bytes"] + 1000) / 1e9
    res = engine.run(
        compose_config(["trainer.steps=2", f"trainer.max_memory_gb={cap}", *FAST]), tmp_path / "p"
    )
    assert res["status"] == "oom" and "predicted peak" in res["error"] and set(built) == {"meta"}
    guard = res["memory"]["guard"]
    assert guard["predicted_peak_bytes"] > cap * 1e9
    # A cap above the prediction lets the run go on; op has no closed form, so its meta count is
    # used.
    ok = engine.run(
        compose_config(
            [
                "trainer.steps=1",
                "+strategy=op",
                f"trainer.max_memory_gb={2 * guard['predicted_peak_bytes'] / 1e9}",
                *FAST,
            ]
        ),
        tmp_path / "b",
    )
    assert ok["status"] == "ok" and 0 < ok["memory"]["guard"]["predicted_peak_bytes"]
    proc = run_cli(
        ["trainer.max_memory_gb=-1", *FAST, f"hydra.run.dir={tmp_path / 'c'}"], cwd=tmp_path
    )
    assert proc.returncode == 2 and "max_memory_gb" in proc.stderr

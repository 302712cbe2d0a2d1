"""The memory probe on the training run's own steps 0 and 1 (recompute_lab.measure.probe
.shares_training_steps; engine.probed_train_step): the memory section is the one a probe on a fresh
model records, and the loss history the one an unprobed run records, figure for figure."""

from __future__ import annotations

import pytest
import torch

from recompute_lab.run import engine

from conftest import FAST, compose_config

STEPS = ["trainer.steps=3"]
SEPARATE = ["trainer.warmup_steps=1"]  # the measured step would be timed: a fresh model's probe


def train(tmp_path, *overrides: str) -> dict:
    res = engine.run(compose_config([*FAST, *STEPS, *overrides]), tmp_path)
    assert res["status"] == "ok", res.get("error")
    return res


def shared(res: dict) -> bool:
    return res["time"]["loop"]["probe_s"] > 0


@pytest.mark.cover()  # each value once in the fast run; the full product with -m slow
@pytest.mark.parametrize("precision", ["fp32", "bf16_master"])
@pytest.mark.parametrize("strategy", ["none", "full", "selective", "op", "budget"])
def test_memory_figures_are_the_fresh_model_probes(tmp_path, strategy, precision):
    config = (f"+strategy={strategy}", f"precision={precision}")
    on_steps = train(tmp_path / "shared", *config)
    fresh = train(tmp_path / "fresh", *config, *SEPARATE)
    assert shared(on_steps) and not shared(fresh)
    # every memory figure: saved bytes by module and op, MemTracker's peak by category and after
    # forward, torch_remat's report, the model state after step 0, the plan
    assert on_steps["memory"] == fresh["memory"]
    assert on_steps["memory"]["peak_bytes"]["measured"] > 0
    assert on_steps["loss"]["history"] == fresh["loss"]["history"]
    assert on_steps["strategy"]["recomputed"] == fresh["strategy"]["recomputed"]


@pytest.mark.parametrize("strategy", ["none", "full"])
def test_loss_history_is_the_unprobed_runs(tmp_path, strategy):
    # dropout draws from the RNG: the probe's own forwards must draw nothing from the run's stream
    config = ("model.dropout=0.1", f"+strategy={strategy}", "trainer.steps=5")
    probed = train(tmp_path / "a", *config)
    unprobed = train(tmp_path / "b", *config, "trainer.probe=false")
    assert shared(probed) and probed["memory"]["activation_bytes"]["measured"] > 0
    assert probed["loss"]["history"] == unprobed["loss"]["history"]
    # the measured step is a warmup step: timed, but not in the statistics
    assert len(probed["time"]["step_s"]) == 5 and probed["time"]["warmup_steps"] == 3


def test_where_the_steps_are_not_shared(tmp_path):
    from recompute_lab.config.spec import RunSpec
    from recompute_lab.measure.probe import shares_training_steps

    def spec(*overrides):
        return RunSpec.of(compose_config([*FAST, *STEPS, *overrides]))

    assert shares_training_steps(spec(), "cpu")
    assert not shares_training_steps(spec(), "cuda")  # the allocator counts the whole device
    for refused in (
        "trainer.grad_accum=2",
        "trainer.steps=1",
        "trainer.warmup_steps=1",
        "trainer.probe=false",
    ):
        assert not shares_training_steps(spec(refused), "cpu"), refused


@pytest.mark.parametrize("fails", ["before_step", "after_step"])
def test_a_failing_tracker_never_takes_a_half_or_double_step(tmp_path, monkeypatch, fails):
    """MemTracker failing inside the measured step (it reports unavailable, as its guard does):
    before the optimizer stepped the step runs again from where it began, after it the step
    stands; either way the run trains exactly as an unprobed one."""
    real = engine.mem_tracker_step

    def failing(model, optimizer, forward, finish, inputs=()):
        loss = forward()
        if fails == "after_step":
            finish(loss)
        else:
            loss.backward()  # gradients half made, dropout drawn: the retry must undo both
        return {"available": False, "reason": "MemTracker failed: RuntimeError: test"}

    monkeypatch.setattr(engine, "mem_tracker_step", failing)
    config = ("model.dropout=0.1", "trainer.steps=4")
    probed = train(tmp_path / "a", *config)
    monkeypatch.setattr(engine, "mem_tracker_step", real)
    unprobed = train(tmp_path / "b", *config, "trainer.probe=false")
    assert probed["loss"]["history"] == unprobed["loss"]["history"]
    peak = probed["memory"]["peak_bytes"]
    assert peak["measured"] is None and "test" in peak["mem_tracker"]["reason"]
    assert probed["memory"]["activation_bytes"]["measured"] > 0  # the counts need no tracker


def test_a_diverging_measured_step_ends_the_run_as_diverged(tmp_path, monkeypatch):
    from recompute_lab.model import precision

    real = precision.PrecisionPolicy.clip_grad_norm
    calls = []

    def clip(self, model, optimizer, max_norm):
        calls.append(1)
        norm = real(self, model, optimizer, max_norm)
        return torch.full_like(norm, float("nan")) if len(calls) == 2 else norm

    monkeypatch.setattr(precision.PrecisionPolicy, "clip_grad_norm", clip)
    res = engine.run(compose_config([*FAST, "trainer.steps=4"]), tmp_path)
    assert res["status"] == "diverged" and "at step 1" in res["error"]
    assert len(res["loss"]["history"]) == 2 and len(calls) == 2  # not retried, not swallowed

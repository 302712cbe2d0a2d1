"""One prediction path: every command that reports a predicted quantity (model state, saved
activations, the
step's peak, FLOPs) reports recompute_lab.predict.prediction.predict's figure for it.

The consumers: the memory guard (memory.guard), the probe's predicted figures and the run's
model-state and FLOP
predictions (results.json), ``estimate`` (estimate.json), the budget planner's device-memory budget.
A grid of
configs (our GPT and a Hugging Face Llama, three precisions, none / selective / full / budget, one
process and
an FSDP rank's shape) must agree to the byte; and a consumer that computed a figure its own way
would not follow
a change of ``predict``: the second test shifts predict's figures and requires every consumer to
move with them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_config
from recompute_lab.cli.estimate import estimate
from recompute_lab.config import EstimateConfig
from recompute_lab.config.spec import RunSpec
from recompute_lab.measure.memory import meta_saved_tensors, saved_tensors
from recompute_lab.measure.probe import guard_memory, shape_of
from recompute_lab.model.gpt import build_model
from recompute_lab.model.precision import make_precision
from recompute_lab.predict import prediction
from recompute_lab.run.engine import run
from recompute_lab.strategies import apply_strategy

GPT = ["model=tiny", "model.n_layer=2", "data.batch_size=2", "data.seq_len=32"]
HF = [
    "model=hf",
    "model.hf.config=llama3_8b",
    "model.n_kv_head=2",
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.d_ff=128",
    "model.vocab_size=256",
    "model.max_seq_len=64",
    "data.batch_size=2",
    "data.seq_len=16",
]
MODELS = {"gpt": GPT, "hf_llama": HF}
STRATEGIES = {
    "none": ["+strategy=none"],
    "selective": ["+strategy=selective"],
    "full": ["+strategy=full"],
    "budget": ["+strategy=budget"],
}
PRECISIONS = ("fp32", "bf16_autocast", "bf16_master")
# An explicit guard limit: the guard then prices every strategy (budget included) on a meta replica.
GUARD = ["trainer.max_memory_gb=20"]


def overrides(model: str, precision: str, strategy: str) -> list[str]:
    if model == "hf_llama":
        pytest.importorskip("transformers")
    return [
        *MODELS[model],
        f"precision={precision}",
        *STRATEGIES[strategy],
        *FAST,
        *GUARD,
        "trainer.steps=2",
        "trainer.warmup_steps=0",
    ]


def reference(
    spec: RunSpec, device: str = "cpu"
) -> tuple[prediction.Prediction, prediction.Prediction]:
    """predict() for the plan the strategy makes on a meta replica (what the guard and estimate
    build); and the
    guard's, which where the theory has no closed form prices activations counted on that
    replica."""
    meta = build_model(spec.model, "meta", make_precision(spec.precision).param_dtype).train()
    plan = apply_strategy(meta, spec.strategy, spec.shape())
    pred = prediction.predict(spec, plan, shape_of(spec, device), meta.get_num_params())
    if pred.activation_bytes is not None:
        return pred, pred
    counted = meta_saved_tensors(meta, spec.data.batch_size, spec.data.seq_len, device)["total"]
    return pred, prediction.predict(
        spec, plan, shape_of(spec, device), meta.get_num_params(), counted
    )


def consumers(ov: list[str], tmp_path: Path) -> dict:
    """Every command's figure for each predicted quantity of the config ``ov`` composes
    (command.quantity)."""
    cfg = compose_config(ov)
    spec = RunSpec.of(cfg)
    results: dict = {"memory": {}}
    guard_memory(spec, make_precision(spec.precision), torch.device("cpu"), results)
    guard = results["memory"]["guard"]
    rec = run(cfg, tmp_path / "run")
    assert rec["status"] == "ok", rec.get("error")
    mem = rec["memory"]
    est = estimate(compose_config(ov), EstimateConfig(target="cpu"))
    return {
        "guard.model_state": guard["predicted_model_state_bytes"],
        "guard.peak": guard["predicted_peak_bytes"],
        "run.model_state": mem["model_state_bytes"]["predicted"],
        "run.activations": mem["activation_bytes"]["predicted"],
        "run.peak": mem["peak_bytes"]["predicted"],
        "run.flops": rec["flops"]["predicted_per_step"],
        "estimate.model_state": est["memory"]["model_state_bytes"]["predicted"],
        "estimate.activations": est["memory"]["activation_bytes"]["predicted"],
        "estimate.peak": est["memory"]["peak_bytes"]["predicted"],
    }


def expected(pred: prediction.Prediction, guarded: prediction.Prediction) -> dict:
    return {
        "guard.model_state": guarded.model_state["total"],
        "guard.peak": guarded.peak_bytes,
        "run.model_state": pred.model_state["total"],
        "run.activations": pred.activation_bytes,
        "run.peak": pred.peak_bytes,
        "run.flops": pred.flops,
        "estimate.model_state": pred.model_state["total"],
        "estimate.activations": pred.activation_bytes,
        "estimate.peak": pred.peak_bytes,
    }


@pytest.mark.cover("model", "precision", "strategy")
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", list(MODELS))
def test_every_command_reports_the_one_prediction(tmp_path, model, precision, strategy):
    ov = overrides(model, precision, strategy)
    got = consumers(ov, tmp_path)
    assert got == expected(*reference(RunSpec.of(compose_config(ov))))


def test_fsdp_rank_shape_is_one_prediction_too():
    """Under fsdp the guard and the run price one rank (padded dim-0 shards): both through
    predict()."""
    spec = RunSpec.of(compose_config(overrides("gpt", "bf16_master", "full")))
    shape = spec.shape("cpu", "fsdp", 2, 1)
    pred = prediction.predict(spec, None, shape)
    assert pred.model_state == prediction.model_state(spec.model, shape)
    whole = prediction.predict(spec, None, spec.shape("cpu"))
    assert pred.model_state["total"] < whole.model_state["total"]  # sharded over two ranks


def test_a_consumer_with_its_own_formula_fails(tmp_path, monkeypatch):
    """Shift predict()'s figures by a known amount: every consumer must report the shifted figure.
    One that kept
    a formula of its own (e.g. the probe computing activations with theory directly) would not
    move."""
    ov = overrides("gpt", "fp32", "full")
    before = consumers(ov, tmp_path / "a")
    real_predict, real_state = prediction.predict, prediction.model_state
    delta = 1000

    def shifted_state(*args, **kwargs):
        state = real_state(*args, **kwargs)
        return {**state, "total": state["total"] + delta}

    def shifted(*args, **kwargs):
        p = real_predict(*args, **kwargs)
        return dataclasses.replace(
            p,
            model_state={**p.model_state, "total": p.model_state["total"] + delta},
            activations={**p.activations, "total": p.activations["total"] + delta},
            peak={**p.peak, "total": p.peak["total"] + delta},
            flops={**p.flops, "forward": p.flops["forward"] + delta},
        )

    monkeypatch.setattr(prediction, "predict", shifted)
    monkeypatch.setattr(prediction, "model_state", shifted_state)
    after = consumers(ov, tmp_path / "b")
    for key, value in before.items():
        moved = (
            after[key]["forward"] - value["forward"]
            if key.endswith("flops")
            else after[key] - value
        )
        assert moved == delta, f"{key} did not follow predict(): it has a formula of its own"


def test_the_budget_planners_device_memory_budget_is_the_predicted_step_peak(monkeypatch):
    """strategy.device_memory_gb: the activation budget is the most the step's predicted peak
    (predict()'s, every phase, model state for this rank) lets the plan save, not the device minus
    the model state, and it follows predict() when that changes (a formula of its own would not)."""
    spec = RunSpec.of(
        compose_config(
            [
                *GPT,
                "+strategy=budget",
                "strategy.device_memory_gb=0.01",
                "strategy.budget_fraction=null",
            ]
        )
    )
    meta = build_model(spec.model, "meta").train()
    shape = shape_of(spec, "cpu")
    plan = apply_strategy(meta, spec.strategy, shape)
    budget, n = plan.details["budget"], meta.get_num_params()
    state = prediction.model_state(spec.model, shape, n)["total"]
    region = budget["largest_region"]
    assert budget["model_state_bytes"] == state and budget["reserve"]["total"] == 0  # CPU
    assert budget["peak_limit"] == budget["device_bytes"] == int(0.01e9)

    def peak(activations: int) -> dict:
        return prediction.step_peak(spec.model, shape, activations, region, n)

    assert peak(budget["bytes"])["total"] <= int(0.01e9) < peak(budget["bytes"] + 1)["total"]
    assert peak(budget["bytes"] + 1)["phase"] == budget["binding_phase"]
    # here backward_start binds (no gradients yet): more room than the device minus model state
    bare = budget["phases_without_activations"][budget["binding_phase"]]
    assert budget["bytes"] == int(0.01e9) - bare != int(0.01e9) - state
    # the plan's own peak, as every consumer reports it, fits
    ran = prediction.predict(spec, plan, shape, n)
    assert ran.peak_bytes == plan.details["predicted_peak"]["total"] <= int(0.01e9)
    real = prediction.model_state

    def shifted(*a, **k):
        out = real(*a, **k)
        per = {**out["per_param"], "params": out["per_param"]["params"] + 1000}
        return {**out, "per_param": per, "total": out["total"] + 1000}

    monkeypatch.setattr(prediction, "model_state", shifted)
    moved = apply_strategy(build_model(spec.model, "meta").train(), spec.strategy, shape)
    assert moved.details["budget"]["bytes"] == budget["bytes"] - 1000


def test_measured_counts_the_rng_state_each_checkpoint_region_keeps():
    """torch.utils.checkpoint keeps torch.get_rng_state() (a uint8 tensor, 5,056 B on torch 2.13)
    per region with preserve_rng_state: host memory the pack hook and the dispatch mode never see.
    measure.memory counts it apart (rng_state_bytes), so measured activations stay theory's."""
    state = torch.get_rng_state().untyped_storage().nbytes()
    for strategy, regions in (("none", 0), ("full", 2), ("selective", 2)):
        spec = RunSpec.of(compose_config([*GPT, f"+strategy={strategy}"]))
        model = build_model(spec.model).train()
        apply_strategy(model, spec.strategy, spec.shape())
        idx = torch.zeros(2, 32, dtype=torch.long)
        counted = saved_tensors(model, lambda m=model, i=idx: m(i, i.clone()))
        assert counted["rng_states"] == regions and counted["rng_state_bytes"] == regions * state

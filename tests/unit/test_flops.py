"""FLOPs: FlopCounterMode counts on meta replicas vs the analytic formulas, recompute accounting,
MFU/HFU."""

from __future__ import annotations

import pytest
import torch

from torch.utils.checkpoint import set_checkpoint_early_stop

from recompute_lab.measure import flops
from recompute_lab.model.gpt import build_model
from recompute_lab.strategies import Plan, apply_strategy
from recompute_lab.strategies.wrap import checkpoint_module
from recompute_lab.config.spec import RunSpec

from conftest import compose_config

SHAPES = [
    ["model=tiny"],
    ["model=tiny", "model.attention=eager", "model.dropout=0.1"],
    [
        "model=tiny",
        "model.mlp=swiglu",
        "model.norm=rmsnorm",
        "model.positions=rope",
        "model.n_kv_head=2",
    ],
    ["model=small", "data.seq_len=128", "data.batch_size=2"],
    [
        "model=small",
        "data.seq_len=128",
        "data.batch_size=2",
        "model.attention=eager",
        "model.tie_embeddings=false",
    ],
    ["model=toy_mlp"],
]


@pytest.mark.parametrize("overrides", SHAPES)
def test_counted_forward_and_backward_match_prediction(overrides):
    cfg = compose_config([*overrides, "+strategy=none"])
    counted = flops.count_step_flops(RunSpec.of(cfg))
    predicted = flops.predict_step_flops(RunSpec.of(cfg), Plan("none", ""))
    assert counted["recompute"] == predicted["recompute"] == 0
    # The issue asks for 5%; the formula is exact for this model, so hold it to 0.1%.
    assert counted["forward"] == pytest.approx(predicted["forward"], rel=1e-3)
    assert counted["backward"] == pytest.approx(predicted["backward"], rel=1e-3)


@pytest.mark.parametrize("overrides", SHAPES)
def test_full_recompute_is_one_forward_of_every_block(overrides):
    """Full reruns each block's forward; with early stop (PyTorch's default) minus a trailing
    unneeded matmul."""
    cfg = compose_config([*overrides, "+strategy=full"])
    b, s = cfg.data.batch_size, cfg.data.seq_len
    model = build_model(cfg.model, device="meta")
    head = 2 * b * s * cfg.model.d_model * cfg.model.vocab_size
    fwd_none, _, _, _ = flops.count_model_flops(model, b, s)
    blocks_forward = (
        fwd_none - head
    )  # independent of the per-module formulas: counted forward minus the head
    with set_checkpoint_early_stop(False):  # recompute the whole block, no early stop
        counted = flops.count_step_flops(RunSpec.of(cfg))
    assert counted["recompute"] == blocks_forward
    counted_default = flops.count_step_flops(RunSpec.of(cfg))
    plan = apply_strategy(
        build_model(cfg.model, device="meta"), cfg.strategy, RunSpec.of(cfg).shape()
    )
    assert (
        counted_default["recompute"] == flops.predict_step_flops(RunSpec.of(cfg), plan)["recompute"]
    )
    if cfg.model.dropout > 0:  # dropout after mlp.proj needs proj's output: nothing is skipped
        assert counted_default["recompute"] == blocks_forward
    else:
        assert counted_default["recompute"] < blocks_forward


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(
    "parts",
    [
        ["attn.core"],
        ["attn"],
        ["mlp"],
        ["attn", "mlp"],
        ["norm1", "attn.core"],
        ["attn.qkv", "mlp.fc"],
    ],
)
def test_sub_module_recompute_prediction(parts, dropout):
    cfg = compose_config(["model=tiny", "model.attention=eager", f"model.dropout={dropout}"])
    b, s = cfg.data.batch_size, cfg.data.seq_len
    _, bwd_none, _, _ = flops.count_model_flops(build_model(cfg.model, device="meta").train(), b, s)
    model = build_model(cfg.model, device="meta").train()
    recomputed = []
    for i, block in enumerate(model.blocks):
        for part in parts:
            checkpoint_module(block.get_submodule(part))
            recomputed.append(f"blocks.{i}.{part}")
    _, bwd, _, _ = flops.count_model_flops(model, b, s)
    predicted = flops.predict_step_flops(RunSpec.of(cfg), Plan("custom", "", recomputed=recomputed))
    assert bwd - bwd_none == predicted["recompute"]


def test_grad_accum_scales_per_step_flops():
    one = flops.count_step_flops(RunSpec.of(compose_config(["+strategy=full"])))
    two = flops.count_step_flops(
        RunSpec.of(compose_config(["+strategy=full", "trainer.grad_accum=2"]))
    )
    assert {k: two[k] for k in ("forward", "backward", "recompute")} == {
        k: 2 * one[k] for k in ("forward", "backward", "recompute")
    }


def test_unpredictable_plans_say_why():
    cfg = compose_config([])
    op = compose_config(["+strategy=op"])
    out = flops.predict_step_flops(
        RunSpec.of(cfg), apply_strategy(build_model(op.model, device="meta"), op.strategy)
    )
    assert out["recompute"] is None and "recompute_unpredicted_reason" in out
    out = flops.predict_step_flops(RunSpec.of(cfg), Plan("x", "", recomputed=["head"]))
    assert out["recompute"] is None and "head" in out["recompute_unpredicted_reason"]


def test_utilization_with_known_peak():
    u = flops.utilization(model_flops=6e12, recompute_flops=2e12, step_s=2.0, peak=10e12)
    assert u["mfu"] == pytest.approx(0.3) and u["hfu"] == pytest.approx(0.4)
    assert flops.utilization(1.0, 0.0, 1.0, None) == {"mfu": None, "hfu": None}


def test_peak_table_lookup(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    rate, source = flops.peak_flops(torch.device("cuda"), torch.bfloat16)
    assert rate == 989e12 and "H200" in source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert flops.peak_flops(torch.device("cuda"), torch.float32)[0] == 19.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert flops.peak_flops(torch.device("cuda"), torch.float32)[0] is None


def test_cpu_gemm_peak_is_measured_and_cached():
    rate, source = flops.peak_flops(torch.device("cpu"), torch.float32)
    assert rate > 1e8 and "measured" in source
    assert flops.peak_flops(torch.device("cpu"), torch.float32)[0] == rate  # cached per process


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(
    "overrides",
    [
        ["+strategy=selective"],
        ["+strategy=selective", "strategy.modules=[attn,mlp]"],
        ["+strategy=selective", "strategy.modules=[core_attn,norm]"],
        ["+strategy=layers", "strategy.method=uniform", "strategy.num_layers=2"],
        ["+strategy=layers", "strategy.method=block", "strategy.num_layers=3"],
        ["+strategy=layers", "strategy.method=every", "strategy.every=2"],
        ["+strategy=sqrt"],
        ["+strategy=full", "strategy.offload=true"],
        ["+strategy=offload"],
    ],
)
def test_every_module_level_strategy_recompute_is_predicted_exactly(overrides, dropout):
    cfg = compose_config(
        [*overrides, "model.n_layer=4", "model.attention=eager", f"model.dropout={dropout}"]
    )
    plan = apply_strategy(
        build_model(cfg.model, device="meta"), cfg.strategy, RunSpec.of(cfg).shape()
    )
    assert (
        flops.count_step_flops(RunSpec.of(cfg))["recompute"]
        == flops.predict_step_flops(RunSpec.of(cfg), plan)["recompute"]
    )


@pytest.mark.parametrize("name", ["op", "regions"])
def test_op_and_region_plans_are_counted_not_guessed(name):
    cfg = compose_config(
        [f"+strategy={name}", "strategy.every_other_mm=true"]
        if name == "op"
        else [f"+strategy={name}", "strategy.save=[attn.core]"]
    )
    plan = apply_strategy(
        build_model(cfg.model, device="meta"), cfg.strategy, RunSpec.of(cfg).shape()
    )
    counted = flops.count_step_flops(RunSpec.of(cfg))["recompute"]
    with set_checkpoint_early_stop(False):
        blocks_forward = flops.count_step_flops(RunSpec.of(compose_config(["+strategy=full"])))[
            "recompute"
        ]
    # Some matmuls rerun, never more than one forward of every block. (torch_remat has no early
    # stop: with
    # save=[attn.core] it reruns mlp.proj too, which torch.utils.checkpoint's `full` skips when
    # dropout is 0.)
    assert 0 < counted <= blocks_forward
    assert flops.predict_step_flops(RunSpec.of(cfg), plan)["recompute"] is None


def test_counts_kept_per_process_equal_a_fresh_count_and_each_input_is_a_new_question(
    monkeypatch,
):
    """count_step_flops keeps its counts by what decides them (flops._COUNTED): an answer read back
    equals a fresh count, and a change of strategy, plan, micro-batch, dtype, model or checkpoint
    early stop is counted anew. Callers get copies of the per-op tables."""
    monkeypatch.setattr(flops, "_COUNTED", {})
    calls = []
    count = flops.count_model_flops
    monkeypatch.setattr(flops, "count_model_flops", lambda *a: calls.append(a[1:]) or count(*a))

    def counted(overrides, **kw):
        return flops.count_step_flops(RunSpec.of(compose_config(["model=tiny", *overrides])), **kw)

    full = counted(["+strategy=full"])
    assert len(calls) == 2  # the strategy-free replica and the strategy's
    again = counted(["+strategy=full"])
    assert again == full and len(calls) == 2
    again["forward_by_op"].clear()
    assert counted(["+strategy=full"])["forward_by_op"] == full["forward_by_op"] != {}
    flops._COUNTED.clear()
    assert counted(["+strategy=full"]) == full  # the kept answer is the fresh one
    calls.clear()
    layers = counted(["+strategy=layers", "strategy.num_layers=1"])
    assert len(calls) == 1 and layers["recompute"] < full["recompute"]  # baseline read back
    assert counted(["+strategy=full"], param_dtype=torch.bfloat16) == full  # dtypes: same FLOPs
    assert len(calls) == 3  # ... but asked anew
    plan = apply_strategy(
        build_model(compose_config(["model=tiny"]).model, device="meta"),
        RunSpec.of(compose_config(["model=tiny", "+strategy=layers"])).strategy,
        RunSpec.of(compose_config(["model=tiny"])).shape(),
    )
    counted(["+strategy=full"], plan=plan)
    assert len(calls) == 4
    counted(["+strategy=full", "data.batch_size=3"])
    counted(["+strategy=full", "model.n_layer=3"])
    assert len(calls) == 8  # new micro-batch, new model: both replicas counted
    with set_checkpoint_early_stop(False):
        no_stop = counted(["+strategy=full"])
    assert len(calls) == 10 and no_stop["recompute"] > full["recompute"]

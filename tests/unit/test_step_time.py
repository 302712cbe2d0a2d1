"""The step-time model (recompute_lab.predict.step_time) against independent paths: its per-layer
FLOPs are recompute_lab.predict.flops' closed forms, its MFU numerator is predict_step_flops'
model FLOPs, its pipeline follows the 1F1B count, and its parts move the way the model says
(recomputation adds time, communication grows with tp, a faster link hides more)."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from conftest import compose_config
from recompute_lab.config import ConfigError, LayoutConfig
from recompute_lab.config.spec import RunSpec, Shape
from recompute_lab.predict import flops as F
from recompute_lab.predict import step_time as T

H100 = T.rates_of("h100_80gb")


def spec(*ov: str) -> RunSpec:
    return RunSpec.of(compose_config(["model=llama3_8b", "precision=bf16_master", *ov]))


def lay(**kw):
    return OmegaConf.structured(LayoutConfig(**kw))


@pytest.mark.parametrize("tp,cp", [(1, 1), (2, 1), (4, 2), (8, 1)])
def test_layer_flops_are_the_closed_forms(tp, cp):
    """The ops' forward FLOPs on one rank, times the tp x cp ranks, are the block's FLOPs of
    recompute_lab.predict.flops (queries s / cp meet all s keys on each cp rank)."""
    m = spec().model
    b, s = 2, 4096
    ops = T.layer_ops(m, b, s, tp, cp, True, 2)
    parts = F.module_forward_flops(RunSpec(model=m), b, s)
    assert sum(o.flops for o in ops) * tp * cp == parts["block"]
    by = {o.name: o.flops * tp * cp for o in ops}
    for name in ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj", "attn.core"):
        assert by[name] == parts[name]


def test_mfu_counts_the_model_flops_of_predict_step_flops():
    """model FLOPs per step = 3 x predict_step_flops' forward for the global batch (the head
    included); MFU = that / GPUs / step seconds / peak."""
    sp = spec("data.batch_size=1", "data.seq_len=8192")
    layout = lay(dp_shard=8)
    t = T.step_time(sp.model, layout, "none", 1, 8192, H100)
    whole = spec("data.batch_size=8", "data.seq_len=8192")  # 8 ranks x 1 sequence
    model_flops = 3 * F.predict_step_flops(whole)["forward"]
    assert t["mfu"] == pytest.approx(model_flops / 8 / t["step_s"] / H100.bf16_flops, rel=1e-12)
    assert t["hfu"] == pytest.approx(t["mfu"], rel=1e-12)  # nothing recomputed
    full = T.step_time(sp.model, layout, "full", 1, 8192, H100)
    # full recomputation reruns the block but mlp.proj: HFU's extra FLOPs are those
    parts = F.module_forward_flops(RunSpec(model=sp.model), 8, 8192)
    extra = sp.model.n_layer * (parts["block"] - parts["mlp.proj"])
    assert full["hfu"] * full["step_s"] == pytest.approx(
        (model_flops + extra) / 8 / H100.bf16_flops, rel=1e-9
    )


def test_recomputation_adds_time_in_order():
    m = spec().model
    t = {
        s: T.step_time(m, lay(dp_shard=8), s, 1, 8192, H100)
        for s in ("none", "selective", "none + 4/32 full", "full")
    }
    order = [t[s]["step_s"] for s in ("none", "selective", "none + 4/32 full", "full")]
    assert order[0] < order[1] < order[3] and order[0] < order[2] < order[3]
    assert t["none"]["breakdown"]["recompute"] == 0
    # n/L full reruns n layers of full: 4/32 of full's recompute time
    assert t["none + 4/32 full"]["breakdown"]["recompute"] == pytest.approx(
        t["full"]["breakdown"]["recompute"] * 4 / 32, rel=1e-12
    )


def test_pipeline_1f1b_takes_m_plus_p_minus_1_micro_batch_times():
    m = spec().model
    t = T.step_time(m, lay(pp=4, microbatches=8), "full", 1, 4096, H100)
    slow = max(r["micro_batch_s"] for r in t["stages"])
    assert t["breakdown"]["bubble"] == pytest.approx(3 * slow)
    pipe = t["step_s"] - t["breakdown"]["optimizer"]
    assert pipe == pytest.approx((8 + 4 - 1) * slow)


def test_communication_grows_with_tp_and_shrinks_with_bandwidth():
    m = spec().model
    t2 = T.step_time(m, lay(tp=2), "none", 1, 4096, H100)
    t8 = T.step_time(m, lay(tp=8), "none", 1, 4096, H100)
    assert t8["comm"]["tp_per_layer_fwd_s"] > t2["comm"]["tp_per_layer_fwd_s"] > 0
    fast = dataclasses.replace(H100, intra_bytes_per_s=H100.intra_bytes_per_s * 10)
    t8f = T.step_time(m, lay(tp=8), "none", 1, 4096, fast)
    assert t8f["comm"]["tp_per_layer_fwd_s"] < t8["comm"]["tp_per_layer_fwd_s"]
    # a group that spans nodes uses the network link
    assert T.link(H100, T.Efficiency(), lay(tp=8, dp_shard=2), "dp_shard")[0] == pytest.approx(
        H100.inter_bytes_per_s * 0.8
    )
    assert T.link(H100, T.Efficiency(), lay(tp=8), "tp")[0] == pytest.approx(
        H100.intra_bytes_per_s * 0.8
    )


def test_bad_inputs_name_the_valid_choices():
    with pytest.raises(ConfigError, match="h100_80gb"):
        T.rates_of("h900")
    with pytest.raises(ConfigError, match="none, offload, selective"):
        T.step_time(spec().model, lay(), "sqrt", 1, 1024, H100)
    with pytest.raises(ConfigError, match="efficiency matmul"):
        T.Efficiency(matmul=1.5)
    assert set(T.RATES) == set(__import__("recompute_lab.predict.devices").predict.devices.CARDS)


# Plans whose rerun ops the step-time model reads from their options: its recomputed FLOPs must be
# the ones FlopCounterMode counts when the real strategy wraps a model (independent paths).
PLANS = [
    ["+strategy=op"],
    ["+strategy=op", "strategy.every_other_mm=true"],
    ["+strategy=op", "strategy.save_ops=[aten.addmm]"],
    ["+strategy=op", "strategy.save_ops=[aten.gelu]"],
    ["+strategy=regions"],
    ["+strategy=regions", "strategy.save=[attn.qkv,mlp.fc]"],
    ["+strategy=regions", "strategy.save=[]"],
    ["+strategy=selective", "strategy.modules=[attn,mlp]"],
    ["+strategy=full"],
]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "-".join(p).replace("+strategy=", ""))
def test_rerun_ops_of_a_plan_are_the_counted_recompute_flops(plan, attention):
    from recompute_lab.config.strategies import label_of
    from recompute_lab.measure.flops import count_step_flops

    cfg = compose_config(["model=tiny", f"model.attention={attention}", *plan])
    run = RunSpec.of(cfg)
    label = label_of(OmegaConf.to_container(cfg.strategy))
    b, s = run.data.batch_size, run.data.seq_len
    t = T.step_time(run.model, lay(), label, b, s, H100, "fp32")
    counted = count_step_flops(run)["recompute"]
    assert t["stages"][0]["recompute_flops"] == counted, label
    assert t["breakdown"]["recompute"] > 0  # every plan reruns something (op: the pointwise ops)


def test_offload_moves_the_predicted_saved_bytes_over_the_host_link():
    """offload recomputes nothing; on a GPU every saved byte crosses the host link twice
    (save_on_cpu's copy out in forward, back in backward), at the card's PCIe rate; a CPU copies
    once (its host is its own memory)."""
    from recompute_lab.predict import theory
    from recompute_lab.predict.per_gpu import plan_of

    m = spec().model
    t = T.step_time(m, lay(), "offload", 1, 4096, H100)
    none = T.step_time(m, lay(), "none", 1, 4096, H100)
    moved = T.saved_per_layer(m, 1, False, 1, 4096, 2)
    two = dataclasses.replace(m, n_layer=2)
    st = Shape(1, 4096, precision="bf16_master", device="cuda")
    pred = theory.predict_activations(two, st, plan_of("none", 2, two))
    assert moved["bytes"] == theory.per_layer(pred, 1) > 0
    extra = t["step_s"] - none["step_s"]
    assert extra == pytest.approx(m.n_layer * 2 * moved["bytes"] / H100.host_bytes_per_s)
    assert t["breakdown"]["recompute"] > 0 and t["stages"][0]["recompute_flops"] == 0
    cpu = dataclasses.replace(H100, host_round_trip=False)
    half = T.step_time(m, lay(), "offload", 1, 4096, cpu)["step_s"] - none["step_s"]
    assert half == pytest.approx(extra / 2)
    with pytest.raises(ConfigError, match="host link"):
        T.step_time(m, lay(), "offload", 1, 4096, dataclasses.replace(H100, host_bytes_per_s=0))

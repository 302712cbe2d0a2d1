"""Per-GPU planning from the one prediction path (recompute_lab.predict.per_gpu).

A layout that only shards the model state (FSDP over dp_shard) must give every rank exactly the
one-device prediction (recompute_lab.predict.prediction.predict) for an FSDP rank's Shape: same
model state, same activations, same peak and phase. That holds for our GPT and for a Hugging Face
model (whose embedding, final norm and head the per-GPU state used to drop, and whose activations
come from the HF theory). The inverse questions (largest micro-batch and sequence that fit) are
checked one unit past their answer, and the 8B question is asked once through the real CLI.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from recompute_lab.config import LayoutConfig
from recompute_lab.config.spec import RunSpec, Shape
from recompute_lab.model.gpt import build_model
from recompute_lab.model.precision import make_precision
from recompute_lab.predict import devices, per_gpu, prediction
from recompute_lab.strategies import apply_strategy

MODELS = {
    "llama3_8b": ["model=llama3_8b"],
    "hf_llama3_8b": ["model=hf", "model.hf.config=llama3_8b"],
    "tiny": ["model=tiny"],
}


def one_device(ov: list[str], strategy: str, b: int, s: int, world: int):
    """predict() for an FSDP rank of ``world`` at (b, s) on the CUDA target, with the plan the
    strategy makes on a meta replica (what estimate builds)."""
    if "model=hf" in ov:
        pytest.importorskip("transformers")
    cfg = compose_config(
        [*ov, "precision=bf16_master", f"+strategy={strategy}", f"data.batch_size={b}",
         f"data.seq_len={s}"]
    )
    spec = RunSpec.of(cfg)
    meta = build_model(spec.model, "meta", make_precision(spec.precision).param_dtype).train()
    plan = apply_strategy(meta, spec.strategy, spec.shape())
    shape = Shape(b, s, precision="bf16_master", device="cuda", parallel="fsdp", world_size=world)
    return spec, prediction.predict(spec, plan, shape, meta.get_num_params())


@pytest.mark.parametrize("strategy", per_gpu.STRATEGIES)
@pytest.mark.parametrize("model,b,s", [("llama3_8b", 1, 8192), ("hf_llama3_8b", 1, 8192),
                                       ("tiny", 2, 64)])
def test_fsdp_rank_is_the_one_device_prediction(model, b, s, strategy):
    spec, pred = one_device(MODELS[model], strategy, b, s, world=8)
    lay = OmegaConf.structured(LayoutConfig(dp_shard=8))
    (row,) = per_gpu.stage_bytes(spec.model, lay, strategy, b, s, "bf16_master", "cuda")
    assert row["model_state"] == pred.model_state["total"]
    assert row["activations"] == pred.activation_bytes
    assert row["total"] == pred.peak_bytes
    assert row["phase"] == pred.peak["phase"]


def test_hf_and_our_llama_differ_only_by_the_activation_theory():
    """Same shapes, same state per GPU (the HF head, embedding and norm are counted); the peaks
    differ by what the two activation theories say (HF's eager-free SDPA core, its RoPE and
    SiLU saved tensors), and the HF model does not fit an H100 80GB without recomputation."""
    lay = OmegaConf.structured(LayoutConfig(dp_shard=8, gpu="h100_80gb"))
    ours_spec, ours = one_device(MODELS["llama3_8b"], "none", 1, 8192, 8)
    hf_spec, hf = one_device(MODELS["hf_llama3_8b"], "none", 1, 8192, 8)
    (a,) = per_gpu.stage_bytes(ours_spec.model, lay, "none", 1, 8192)
    (h,) = per_gpu.stage_bytes(hf_spec.model, lay, "none", 1, 8192)
    assert a["model_state"] == h["model_state"] == ours.model_state["total"]
    assert h["activations"] - a["activations"] == hf.activation_bytes - ours.activation_bytes != 0
    device = devices.device_of(lay)
    assert not device.fit(h["total"], devices.communicators(lay))["fits"]


@pytest.mark.parametrize("strategy", per_gpu.STRATEGIES)
def test_largest_answers_fit_and_one_more_unit_does_not(strategy):
    cfg = RunSpec.of(compose_config(["model=llama3_8b", "precision=bf16_master"])).model
    lay = OmegaConf.structured(LayoutConfig(dp_shard=8, gpu="h100_80gb"))
    device, groups = devices.device_of(lay), devices.communicators(lay)
    got = per_gpu.largest(cfg, lay, strategy, 1, 8192, "bf16_master", "cuda", device)

    def peak(b, s):
        import dataclasses

        model = dataclasses.replace(cfg, max_seq_len=max(s, cfg.max_seq_len))
        return max(r["total"] for r in per_gpu.stage_bytes(model, lay, strategy, b, s))

    s, unit = got["seq"], got["seq_unit"]
    assert s is not None and s % unit == 0
    assert device.fit(peak(1, s), groups)["fits"]
    assert not device.fit(peak(1, s + unit), groups)["fits"]
    mb = got["micro_batch"]
    if mb is None:
        assert not device.fit(peak(1, 8192), groups)["fits"]
    else:
        assert device.fit(peak(mb, 8192), groups)["fits"]
        assert not device.fit(peak(mb + 1, 8192), groups)["fits"]


def test_the_8b_question_in_one_command(tmp_path):
    """Llama-3 8B, s=8192, 8 x H100 80GB: every strategy's peak per GPU, the reserve, the margin,
    and the plan, from one estimate call."""
    out = tmp_path / "est.json"
    proc = run_cli(
        [
            "model=llama3_8b",
            "precision=bf16_master",
            "data.batch_size=1",
            "data.seq_len=8192",
            "estimate.layout.dp_shard=8",
            "estimate.layout.gpu=h100_80gb",
            f"estimate.out={out}",
        ],
        tmp_path,
        module="recompute_lab.estimate",
    )
    assert proc.returncode == 0, proc.stderr
    assert "card h100_80gb: 79.18 GiB" in proc.stdout
    assert "margin" in proc.stdout
    rep = json.loads(out.read_text())
    lay = rep["series"][0]["per_gpu"]
    strategies = {r["strategy"]: r for r in lay["strategies"]}
    assert set(strategies) == set(per_gpu.STRATEGIES)
    assert strategies["full"]["fit"]["fits"]
    assert strategies["full"]["fit"]["margin_bytes"] > 0
    assert strategies["full"]["peak"] < strategies["none"]["peak"]


@pytest.mark.parametrize("strategy", per_gpu.MEASURED)
def test_measured_strategies_per_gpu_are_the_whole_model_count(strategy):
    """op-level SAC and torch_remat regions under a layout: one micro-batch counted on two- and
    three-block meta copies (tensor_parallel.measure_micro_batch) extrapolates to exactly what
    the whole model leaves resident after its forward (its SAC caches and kept region inputs
    included), and the estimate lists the strategy beside the three with its fit."""
    from recompute_lab.measure.memory import meta_saved_tensors
    from recompute_lab.measure.tensor_parallel import measure_micro_batch

    ov = ["model=tiny", "model.n_layer=4", "precision=bf16_master", f"+strategy={strategy}",
          "data.batch_size=2", "data.seq_len=64"]
    spec = RunSpec.of(compose_config(ov))
    meta = build_model(spec.model, "meta", make_precision(spec.precision).param_dtype).train()
    plan = apply_strategy(meta, spec.strategy, spec.shape("cuda"))
    whole = meta_saved_tensors(meta, 2, 64, "cuda")["resident_total"]
    shape = Shape(2, 64, precision="bf16_master", device="cuda", parallel="fsdp", world_size=4)
    one = prediction.predict(spec, plan, shape, meta.get_num_params(), counted_activations=whole)
    lay = OmegaConf.structured(LayoutConfig(dp_shard=4, gpu="a100_40gb"))
    rep = per_gpu.layout_estimate(
        spec.model, lay, strategy, 2, 64, "bf16_master", "cuda",
        measure=measure_micro_batch, options=spec.strategy,
    )
    assert rep["stages"][0]["activations"] == whole == one.activation_bytes
    assert rep["stages"][0]["total"] == one.peak_bytes  # the one-device prediction's peak
    row = rep["strategies"][-1]
    assert row["strategy"] == strategy and row["peak"] == rep["stages"][0]["total"]
    assert row["fit"]["fits"]


def test_strategies_that_differ_by_block_are_refused_under_a_layout(tmp_path):
    proc = run_cli(
        ["model=tiny", "+strategy=layers", "estimate.layout.dp_shard=2"],
        tmp_path,
        module="recompute_lab.estimate",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "strategies none, selective, full, op, regions" in proc.stdout + proc.stderr


def test_per_stage_plan_bisection_is_the_linear_scan():
    """plan_stages finds the smallest n of 'base + n/L full' by bisection; a scan over every n of
    every base (the same candidates, per_gpu._n_full) picks the same plan at budgets from roomy
    to impossible, on 1F1B layouts with 1, 2 and 4 stages."""
    from recompute_lab.predict import layout as L

    spec = RunSpec.of(compose_config(["model=llama3_8b", "precision=bf16_master"]))
    cfg = spec.model
    for pp, tp in ((1, 1), (2, 2), (4, 1)):
        lay = OmegaConf.structured(LayoutConfig(tp=tp, pp=pp, dp_shard=8 // (tp * pp) or 1))
        rows = {n: per_gpu.stage_bytes(cfg, lay, n, 1, 8192) for n in per_gpu.STRATEGIES}
        lo = min(r["total"] for r in rows["full"])
        hi = max(r["total"] for r in rows["none"])
        layer = {n: per_gpu.micro_batch(cfg, tp, tp > 1, n, 1, 8192)["layer"]
                 for n in per_gpu.STRATEGIES}
        cost = {n: per_gpu.layer_recompute_flops(cfg, n, 1, 8192, tp, 1)
                for n in per_gpu.STRATEGIES}
        st = per_gpu.rank_shape(lay, 1, 8192, "bf16_master", "cuda")
        m = L.microbatches(lay)
        for budget in (hi + 1, (hi + lo) // 2, lo + (hi - lo) // 10, lo - 1):
            plan = per_gpu.plan_stages(cfg, lay, budget, 1, 8192)
            for rank, got in enumerate(plan["stages"]):
                state = L.model_state_per_rank(cfg, lay, "bf16_master", stage=rank)
                view = per_gpu.view_of(cfg, lay, rank)
                best = None
                for base in ("none", "selective"):
                    for n in range(rows[base][rank]["layers"] + 1):
                        c = per_gpu._n_full(cfg, lay, st, rows, layer, cost, m, base, rank, n,
                                            state, view)
                        key = (c["total"] > budget, c["recompute_flops"], c["total"])
                        best = (key, c) if best is None or key < best[0] else best
                want = best[1]["strategy"] if not best[0][0] else None
                assert got["strategy"] == want, (pp, tp, budget, rank)

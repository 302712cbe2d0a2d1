"""The budget planner under a parallel layout (recompute_lab.strategies.budget.layout).

Every option is priced per rank on meta copies with PyTorch's tensor-parallel plan; the figures
that have another path are held to it: `none`, `attn.core` and `block` are the per-rank theory's
none / selective / full layer (recompute_lab.predict.tp_theory through per_gpu.micro_batch), the
op-level option is per_gpu's `op` row, the FLOPs are the module formulas split over tp and scaled
by cp. The per-stage solve is checked against a brute force over every layer assignment, and a
plan that keeps every layer `none` is per_gpu.stage_bytes' `none` row to the byte (one peak
function). The CLI answers with the plan and refuses what it cannot plan.
"""

from __future__ import annotations

import itertools
import json

import pytest
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from recompute_lab.config import ConfigError, LayoutConfig
from recompute_lab.config.spec import RunSpec
from recompute_lab.predict import layout as L
from recompute_lab.predict import per_gpu
from recompute_lab.predict.flops import module_forward_flops
from recompute_lab.strategies.budget import layout as BL
from recompute_lab.strategies.budget.solver import cost_key

B, S = 4, 256  # activations dominate the peak (tiny at 2 x 64 is bound by its optimizer step)
LAY = dict(tp=2, sp=True, cp=2, pp=2)


@pytest.fixture(scope="module")
def priced():
    from recompute_lab.measure.tensor_parallel import measure_micro_batch

    spec = RunSpec.of(compose_config(["model=tiny", "model.n_layer=4", "+strategy=budget"]))
    lay = OmegaConf.structured(LayoutConfig(**LAY))
    prices, notes = BL.price_options(
        spec.model, lay, B, S, "bf16_master", "cuda", measure_micro_batch
    )
    return spec, lay, {p.option.name: p for p in prices}, notes


def test_options_priced_per_rank_match_the_per_rank_theory(priced):
    spec, lay, prices, notes = priced
    tp, cp = LAY["tp"], LAY["cp"]
    for option, strategy in (("none", "none"), ("attn.core", "selective"), ("block", "full")):
        layer = per_gpu.micro_batch(spec.model, tp, True, strategy, B, S // cp, 2, "cuda")["layer"]
        assert prices[option].bytes == layer, option
    assert prices["none"].flops == 0 and prices["none"].resaved == 0
    # full recomputation: the block formula (early stop, cp's queries meet all keys), split on tp
    assert prices["block"].flops == per_gpu.layer_recompute_flops(spec.model, "full", B, S, tp, cp)
    # the attention core's kernel reruns whole (flash), its queries meeting all s keys under cp
    core = module_forward_flops(RunSpec(model=spec.model), B, S // cp)["attn.core"]
    assert prices["attn.core"].flops == core * cp // tp
    assert prices["block"].resaved == prices["none"].bytes - prices["block"].bytes
    # regions cannot run on DTensor: left out, with a note saying so
    assert not any(n.startswith("regions") for n in prices)
    assert any("regions" in n and "DTensor" in n for n in notes)


def test_op_option_is_per_gpu_op_row(priced):
    from recompute_lab.config.strategies import OpConfig
    from recompute_lab.measure.tensor_parallel import measure_micro_batch

    spec, _, prices, _ = priced
    op = measure_micro_batch(spec.model, LAY["tp"], True, OpConfig(), B, S // LAY["cp"], 2, "cuda")
    assert prices["op"].bytes == op["layer"]


def brute_force(spec, lay, prices: list, limit: int, rank: int):
    """The cheapest (cost, bytes) over every assignment of options to the stage's layers whose
    peak (per_gpu.rank_peak) fits ``limit``."""
    cfg = spec.model
    counts = L.stage_layers(cfg.n_layer, LAY["pp"])
    st = per_gpu.rank_shape(lay, B, S, "bf16_master", "cuda")
    mb = per_gpu.micro_batch(cfg, LAY["tp"], True, "none", B, S // LAY["cp"], 2, "cuda")
    state = L.model_state_per_rank(cfg, lay, "bf16_master", stage=rank)
    outside = (mb["first"] if rank == 0 else 0) + (mb["last"] if rank == LAY["pp"] - 1 else 0)
    k = L.in_flight_chunks("1f1b", LAY["pp"], L.microbatches(lay), rank)
    best = None
    for combo in itertools.product(prices, repeat=counts[rank]):
        act = k * (outside + sum(p.bytes for p in combo) + max(p.shared for p in combo))
        region = max(p.resaved for p in combo)
        if per_gpu.rank_peak(cfg, lay, st, rank, state, act, region)["total"] > limit:
            continue
        cost = tuple(sum(c) for c in zip(*(cost_key(p, "flops", None) for p in combo)))
        key = (cost, sum(p.bytes for p in combo) + max(p.shared for p in combo))
        best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("squeeze", [0.0, 0.3, 0.6, 0.9, 1.0])
def test_per_stage_solve_is_the_brute_force(priced, squeeze):
    """Limits from everything-`none` (squeeze 0) down to everything-`block` (squeeze 1): the
    solver's plan per stage costs what the cheapest fitting assignment costs."""
    spec, lay, prices, _ = priced
    options = list(prices.values())
    none = per_gpu.stage_bytes(spec.model, lay, "none", B, S)
    full = per_gpu.stage_bytes(spec.model, lay, "full", B, S)
    hi, lo = max(r["total"] for r in none), max(r["total"] for r in full)
    assert lo < hi  # the squeeze spans real choices
    limit = int(hi - squeeze * (hi - lo))
    plan = BL.plan_layout(spec.model, lay, options, limit, B, S)
    by_name = {p.option.name: p for p in options}
    for rank, row in enumerate(plan["stages"]):
        want = brute_force(spec, lay, options, limit, rank)
        assert row["fits"] == (want is not None)
        if want is None:
            continue
        chosen = [by_name[n] for n, c in row["chosen"].items() for _ in range(c)]
        cost = tuple(sum(c) for c in zip(*(cost_key(p, "flops", None) for p in chosen)))
        assert (cost, sum(p.bytes for p in chosen) + max(p.shared for p in chosen)) == want
        assert row["total"] <= limit


def test_an_all_none_plan_is_stage_bytes_none(priced):
    """A card with room for everything: every layer `none`, no recompute, and each stage's peak,
    phase and activations equal per_gpu.stage_bytes' `none` rows (the same peak function)."""
    spec, lay, prices, _ = priced
    plan = BL.plan_layout(spec.model, lay, list(prices.values()), 10**15, B, S)
    none = per_gpu.stage_bytes(spec.model, lay, "none", B, S)
    for row, want in zip(plan["stages"], none):
        assert row["chosen"] == {"none": want["layers"]} and row["recompute_flops"] == 0
        for key in ("activations", "total", "phase", "model_state"):
            assert row[key] == want[key], key
    tight = BL.plan_layout(spec.model, lay, list(prices.values()), 1, B, S)
    assert not tight["fits"] and tight["strategies"] == [None, None]


def test_card_rules():
    lay = OmegaConf.structured(LayoutConfig(dp_shard=2))
    budget = RunSpec.of(compose_config(["model=tiny", "+strategy=budget"])).strategy
    with pytest.raises(ConfigError, match="h100_80gb"):
        BL.card_of(lay, budget)  # no card
    card = BL.card_of(lay, type(budget)(device_memory_gb=80))
    assert card.total_bytes == 80 * 10**9
    with pytest.raises(ConfigError, match="not both"):
        BL.card_of(OmegaConf.structured(LayoutConfig(dp_shard=2, gpu="a100_80gb")),
                   type(budget)(device_memory_gb=80))
    with pytest.raises(ConfigError, match="budget_bytes"):
        BL.card_of(lay, type(budget)(budget_bytes=10**6))


def test_budget_under_a_layout_through_the_cli(tmp_path):
    out = tmp_path / "est.json"
    ov = ["model=tiny", "model.n_layer=4", "precision=bf16_master", "+strategy=budget",
          f"data.batch_size={B}", f"data.seq_len={S}", "estimate.layout.pp=2",
          "estimate.layout.dp_shard=2", "estimate.layout.device_gib=0.8"]
    proc = run_cli([*ov, f"estimate.out={out}"], tmp_path, module="recompute_lab.estimate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "budget plan per stage" in proc.stdout
    rep = json.loads(out.read_text())["series"][0]["per_gpu"]
    assert rep["budget"]["strategies"] == [r["strategy"] for r in rep["stages"]]
    row = next(r for r in rep["strategies"] if r["strategy"] == "budget")
    assert row["peak"] == max(r["total"] for r in rep["stages"])
    assert row["fit"]["fits"] == rep["budget"]["fits"]
    refused = run_cli(ov[:-1], tmp_path, module="recompute_lab.estimate")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "estimate.layout.gpu" in refused.stdout + refused.stderr


def test_interleaved_stages_run_one_option_each(priced):
    """Interleaved 1F1B (v = 2): each rank runs one option on all its layers; with room for
    everything that is `none`, equal to stage_bytes' interleaved `none` rows; squeezed, every
    stage's peak stays within the limit and it recomputes something."""
    spec, _, prices, _ = priced
    lay = OmegaConf.structured(
        LayoutConfig(**LAY, pp_schedule="interleaved", pp_virtual=2, microbatches=4)
    )
    options = list(prices.values())
    none = per_gpu.stage_bytes(spec.model, lay, "none", B, S)
    roomy = BL.plan_layout(spec.model, lay, options, 10**15, B, S)
    for row, want in zip(roomy["stages"], none):
        assert row["chosen"] == {"none": want["layers"]}
        assert (row["activations"], row["total"]) == (want["activations"], want["total"])
    limit = min(r["total"] for r in none) - 1
    tight = BL.plan_layout(spec.model, lay, options, limit, B, S)
    assert any(row["fits"] for row in tight["stages"])
    for row in tight["stages"]:
        if row["fits"]:
            assert row["total"] <= limit and "none" not in row["chosen"]


def test_a_fake_world_does_not_hand_its_meshes_to_the_next():
    """DTensor caches sharding results by mesh value (in Python and in its C++ fast path): after a
    world whose 2-D mesh had a tp slice equal to a later world's 1-D tp mesh, the later model's
    parameters must live on the later mesh, whose process group exists, not on the dead one.
    fake_world clears those caches on exit (pricing under a layout failed when another test
    module's 2-D meshes ran first in the same process)."""
    import torch

    from recompute_lab.measure import tensor_parallel as TP
    from recompute_lab.model.gpt import build_model

    cfg = RunSpec.of(compose_config(["model=tiny", "model.n_layer=1"])).model
    with TP.fake_world(8):
        old = TP.mesh_of({"dp_shard": 1, "tp": 2})
        TP.parallelize(build_model(cfg, "meta", torch.bfloat16), old["tp"], sp=True)
    with TP.fake_world(2):
        mesh = TP.mesh_of({"tp": 2})
        model = TP.parallelize(build_model(cfg, "meta", torch.bfloat16), mesh, sp=True)
        assert all(p.device_mesh is mesh for p in model.parameters())
        TP.measure_rank(model.train(), B, S, "cuda")  # resolves the live group

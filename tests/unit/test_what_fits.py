"""experiments/figures/what_fits.{md,png} are what experiments/what_fits.py computes now (rerun it
and commit
what it writes when this fails), the planner's choices are consistent, and the grid runs in well
under a minute."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
import time

import pytest
from omegaconf import OmegaConf

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import what_fits as wf  # noqa: E402

from recompute_lab.predict import layout as L  # noqa: E402
from recompute_lab.predict import per_gpu  # noqa: E402
from recompute_lab.config import LayoutConfig  # noqa: E402
from recompute_lab.config.spec import RunSpec

FIGS = ROOT / "experiments" / "figures"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("fits")
    t0 = time.perf_counter()
    wf.main(["--out", str(out)])
    return out, time.perf_counter() - t0


def test_committed_table_is_what_the_code_computes(regenerated):
    out, _ = regenerated
    assert (out / "what_fits.md").read_text() == (FIGS / "what_fits.md").read_text(), (
        "experiments/figures/what_fits.md is stale: rerun python experiments/what_fits.py"
    )


def test_committed_figure_is_what_the_code_draws(regenerated):
    import matplotlib

    made_with = re.search(r"\(matplotlib ([^)]+)\)", (FIGS / "what_fits.md").read_text()).group(1)
    if made_with != matplotlib.__version__:
        pytest.skip(f"PNG bytes compared only under matplotlib {made_with}")
    pngs = (regenerated[0] / "what_fits.png", FIGS / "what_fits.png")
    sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in pngs]
    assert sha[0] == sha[1], (
        "experiments/figures/what_fits.png is stale: rerun python experiments/what_fits.py"
    )


def test_planner_recomputes_fewest_layers_that_fit_per_stage():
    """70B, tp8 pp4, 32k: the first stage keeps 4 micro-batches in flight, the last one. With a
    device exactly the
    last stage's need without recomputation, the last stage recomputes nothing and earlier stages
    recompute some
    layers fully, each the fewest that fit (one fewer does not), each plan within the device."""
    cfg = wf.model_cfg("llama3_70b", 32768)
    lay = OmegaConf.structured(LayoutConfig(tp=8, pp=4, dp_shard=8))
    none = per_gpu.stage_bytes(cfg, lay, "none", 1, 32768)
    full = per_gpu.stage_bytes(cfg, lay, "full", 1, 32768)
    assert [r["in_flight"] for r in none] == [4, 3, 2, 1]
    budget = none[-1]["total"]  # exactly what the last stage needs without recomputation
    plan = per_gpu.plan_stages(cfg, lay, budget, 1, 32768)
    assert (
        plan["fits"]
        and plan["strategies"][-1] == "none"
        and all(r["total"] <= budget for r in plan["stages"])
    )
    layer = {
        st: per_gpu.micro_batch(cfg, 8, True, st, 1, 32768)["layer"] for st in ("none", "full")
    }
    for rank, row in enumerate(plan["stages"][:-1]):
        n = row["full_layers"]
        assert 0 < n < row["layers"] and row["strategy"] == f"none + {n}/{row['layers']} full"
        # the same bytes counted from the whole-strategy rows: none's, with n layers' activations
        # swapped for full's
        act = none[rank]["activations"] + none[rank]["in_flight"] * n * (
            layer["full"] - layer["none"]
        )
        assert row["activations"] == act and row["region"] == full[rank]["region"]
        # its peak is the one-path peak of those activations on this rank
        state = L.model_state_per_rank(cfg, lay, "bf16_master", stage=rank)
        st = per_gpu.rank_shape(lay, 1, 32768, "bf16_master", "cuda")
        assert row["total"] == per_gpu.rank_peak(cfg, lay, st, rank, state, act, row["region"])[
            "total"
        ]
        assert (
            row["total"] - row["in_flight"] * (layer["full"] - layer["none"]) > budget
        )  # n - 1 layers: too big
    # recompute FLOPs grow with the layers recomputed; whole-stage full costs the most
    f = [r["recompute_flops"] for r in plan["stages"]]
    assert f == sorted(f, reverse=True) and f[-1] == 0
    assert not per_gpu.plan_stages(cfg, lay, min(r["total"] for r in full) - 1, 1, 32768)["fits"]


def test_layer_recompute_flops_follow_the_flop_module():
    """Full reruns a block but its last linear, selective the attention core's QK^T; both split over
    tp; cp ranks
    see s / cp queries against all s keys."""

    from recompute_lab.measure import flops

    cfg = wf.model_cfg("llama3_70b", 8192)
    parts = flops.module_forward_flops(RunSpec(model=cfg), 1, 8192)
    assert (
        per_gpu.layer_recompute_flops(cfg, "full", 1, 8192, 8, 1)
        == (parts["block"] - parts["mlp.proj"]) // 8
    )
    assert (
        per_gpu.layer_recompute_flops(cfg, "selective", 1, 8192, 8, 1)
        == parts["attn.core"] // 2 // 8
    )
    assert (
        per_gpu.layer_recompute_flops(cfg, "selective", 1, 8192, 8, 4)
        == parts["attn.core"] // 4 // 2 // 8
    )
    assert per_gpu.layer_recompute_flops(cfg, "none", 1, 8192, 8, 4) == 0


def test_context_parallel_is_the_sequence_split_and_refuses_eager():
    """cp ranks hold s / cp tokens of each per-token tensor (flash kernels: no s^2 term), model
    state unchanged."""
    cfg = wf.model_cfg("llama3_70b", 8192)
    cp4 = per_gpu.stage_bytes(cfg, OmegaConf.structured(LayoutConfig(tp=8, cp=4)), "none", 1, 8192)[
        0
    ]
    one = per_gpu.stage_bytes(cfg, OmegaConf.structured(LayoutConfig(tp=8)), "none", 1, 2048)[0]
    assert cp4["activations"] == one["activations"] and cp4["model_state"] == one["model_state"]
    cfg = dataclasses.replace(cfg, attention="eager")
    with pytest.raises(Exception, match="attention=sdpa"):
        per_gpu.stage_bytes(cfg, OmegaConf.structured(LayoutConfig(tp=8, cp=4)), "none", 1, 8192)


def test_docs_planning_figures_are_what_the_code_computes():
    """The figures docs/planning.md quotes (the 8B question's table, the HF peak, the card presets,
    the
    405B layouts and the per-stage plans) and docs/layouts.md quotes (the 70B tp=8 table,
    Korthikanti's
    per-layer figure, selective's peak) are what experiments/what_fits.readme_values computes from
    recompute_lab.predict now."""
    from docs_text import page

    planning, layouts = page("planning"), page("layouts")
    values = wf.readme_values()
    for key, text in (("rows8b", planning), ("cards", planning), ("rows70b", layouts)):
        for line in values[key].splitlines():
            assert line in text, f"the {key} row should read: {line}"
    assert f"`none` peaks at {values['hf_none']} GiB" in planning
    assert f"gives {values['kor']:.2f} GiB per layer with SP" in layouts
    assert f"({values['sel']:.2f} vs {values['none']:.2f} GiB peak with SP)" in layouts
    assert f"({values['f405h100']} on H100 80GB, {values['f405h200']} on H200)" in planning
    assert (
        f"it answers `{values['budget8']}`: no matmul reruns\n({values['budget8_tflop']} TFLOP/step"
        in planning
    )
    assert f"peak {values['budget8_peak']} GiB, margin {values['budget8_margin']} GiB" in planning
    nfull8 = f"`{values['nfull8']}` plan above reruns {values['nfull8_tflop']} TFLOP per step"
    assert nfull8 in planning
    for plan in (values["plan70"], values["plan405"]):
        assert f"`{plan}`" in planning
        assert f"| {plan} |" in (FIGS / "what_fits.md").read_text()  # the table agrees


def test_a_grid_of_your_own_from_overrides(tmp_path):
    """models / seq_lens / cards as Hydra-style overrides: the rows are the default grid's for
    those axes, written outside the committed figures; bad keys, models and cards are refused
    naming the valid ones."""
    axes = wf.parse_overrides(["models=[llama3_70b]", "seq_lens=[8192]", "cards=[h200]"])
    assert axes == {"models": ("llama3_70b",), "seq_lens": (8192,), "cards": ("h200",)}
    mine = wf.grid(axes["models"], axes["seq_lens"], axes["cards"])
    rows = [ln for ln in wf.markdown(mine).splitlines() if ln.startswith("| llama3_70b")]
    committed = (FIGS / "what_fits.md").read_text().splitlines()
    assert len(rows) == 3 and all(r in committed for r in rows)  # the default grid's rows
    wf.main(["--out", str(tmp_path), "models=[llama3_70b]", "seq_lens=[8192]", "cards=[h200]"])
    assert (tmp_path / "what_fits.md").is_file() and (tmp_path / "what_fits.png").is_file()
    for bad, needle in ((["gpus=[8]"], "valid: models"), (["models=[llama9]"], "llama3_8b"),
                        (["cards=[h900]"], "h100_80gb"), (["seq_lens=[0]"], "positive")):
        with pytest.raises(SystemExit, match=needle):
            wf.parse_overrides(bad)

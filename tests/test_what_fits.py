"""experiments/figures/what_fits.{md,png} are what experiments/what_fits.py computes now (rerun it and commit
what it writes when this fails), the planner's choices are consistent, and the grid runs in well under a minute."""
from __future__ import annotations

import hashlib
import re
import sys
import time

import pytest
from omegaconf import OmegaConf

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import what_fits as wf  # noqa: E402

from recompute_lab import per_gpu  # noqa: E402
from recompute_lab.config import LayoutConfig  # noqa: E402

FIGS = ROOT / "experiments" / "figures"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("fits")
    t0 = time.perf_counter()
    wf.main(["--out", str(out)])
    return out, time.perf_counter() - t0


def test_committed_table_is_what_the_code_computes(regenerated):
    out, seconds = regenerated
    assert (out / "what_fits.md").read_text() == (FIGS / "what_fits.md").read_text(), \
        "experiments/figures/what_fits.md is stale: rerun python experiments/what_fits.py"
    assert seconds < 60


def test_committed_figure_is_what_the_code_draws(regenerated):
    import matplotlib

    made_with = re.search(r"\(matplotlib ([^)]+)\)", (FIGS / "what_fits.md").read_text()).group(1)
    if made_with != matplotlib.__version__:
        pytest.skip(f"PNG bytes compared only under matplotlib {made_with}")
    pngs = (regenerated[0] / "what_fits.png", FIGS / "what_fits.png")
    sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in pngs]
    assert sha[0] == sha[1], "experiments/figures/what_fits.png is stale: rerun python experiments/what_fits.py"


def test_planner_picks_the_cheapest_strategy_that_fits_per_stage():
    """70B, tp8 pp4, 32k: the first stage keeps 4 micro-batches in flight, the last one: with a device between
    their needs the planner recomputes fully on early stages and nothing on the last."""
    cfg = wf.model_cfg("llama3_70b", 32768)
    lay = OmegaConf.structured(LayoutConfig(tp=8, pp=4, dp_shard=8))
    none = per_gpu.stage_bytes(cfg, lay, "none", 1, 32768)
    full = per_gpu.stage_bytes(cfg, lay, "full", 1, 32768)
    assert [r["in_flight"] for r in none] == [4, 3, 2, 1]
    budget = none[-1]["total"]  # exactly what the last stage needs without recomputation
    plan = per_gpu.plan_stages(cfg, lay, budget, 1, 32768)
    assert plan["strategies"][-1] == "none" and plan["strategies"][0] == "full" and plan["fits"]
    assert all(r["total"] <= budget for r in plan["stages"])
    assert not per_gpu.plan_stages(cfg, lay, min(r["total"] for r in full) - 1, 1, 32768)["fits"]


def test_context_parallel_is_the_sequence_split_and_refuses_eager():
    """cp ranks hold s / cp tokens of each per-token tensor (flash kernels: no s^2 term), model state unchanged."""
    cfg = wf.model_cfg("llama3_70b", 8192)
    cp4 = per_gpu.stage_bytes(cfg, OmegaConf.structured(LayoutConfig(tp=8, cp=4)), "none", 1, 8192)[0]
    one = per_gpu.stage_bytes(cfg, OmegaConf.structured(LayoutConfig(tp=8)), "none", 1, 2048)[0]
    assert cp4["activations"] == one["activations"] and cp4["model_state"] == one["model_state"]
    cfg.attention = "eager"
    with pytest.raises(Exception, match="attention=sdpa"):
        per_gpu.stage_bytes(cfg, OmegaConf.structured(LayoutConfig(tp=8, cp=4)), "none", 1, 8192)


def test_readme_planning_table_is_what_the_code_computes():
    """README's "Planning a large run" table (Llama-3 70B, 8k, tp=8, FSDP over 8) and the selective total beside it
    are the per-GPU figures of recompute_lab.per_gpu now."""
    text = (ROOT / "README.md").read_text().split("## Planning a large run")[1].split("\n## ")[0]
    cfg = wf.model_cfg("llama3_70b", 8192)
    gb = wf.GB
    for sp, label in ((True, "SP on"), (False, "SP off")):
        lay = OmegaConf.structured(LayoutConfig(tp=8, sp=sp, dp_shard=8))
        rank0 = per_gpu.stage_bytes(cfg, lay, "none", 1, 8192)[0]
        layer = per_gpu.micro_batch(cfg, 8, sp, "none", 1, 8192)["layer"]
        row = (f"| {label} | {layer / gb:.3f} GB | {rank0['activations'] / gb:.1f} GB | "
               f"{rank0['model_state'] / gb:.1f} GB | {rank0['total'] / gb:.1f} GB |")
        assert row in text, f"README's row should read: {row}"
    on = OmegaConf.structured(LayoutConfig(tp=8, sp=True, dp_shard=8))
    sel, none = (per_gpu.stage_bytes(cfg, on, s, 1, 8192)[0]["total"] / gb for s in ("selective", "none"))
    assert f"({sel:.1f} vs {none:.1f} GB)" in text

"""The paper outputs on synthetic records: the between-replicate interval's arithmetic (and that it
covers a fresh replicate as often as it claims), the tables (.md/.csv/.tex), the one style per
strategy, what_fits.tex's total GPUs, and `analyze` on a sweep of estimates."""

from __future__ import annotations

import json
import math
import random

import pytest

from recompute_lab.analysis import aggregate, derive, style, tables
from recompute_lab.analysis.aggregate import prediction_interval

from conftest import ROOT

BASE_CFG = {
    "model": {"name": "tiny", "attention": "eager", "n_layer": 2, "d_model": 64, "n_head": 4},
    "precision": {"name": "fp32"},
    "data": {"seq_len": 128, "batch_size": 8},
    "trainer": {"seed": 0},
}


def record(strategy: str, ratio, ci=(None, None), tps=1000.0, loss=(5.5, 5.4)) -> dict:
    cfg = {**BASE_CFG, "strategy": {"name": strategy}}
    return {
        "status": "ok",
        "config": cfg,
        "env": {"device": "cpu", "device_name": "x86_64", "num_threads": 1},
        "model": {"params": 1000, "seq_len": 128, "batch_size": 8},
        "memory": {"activation_bytes": {"measured": 100 if strategy == "none" else 40}},
        "flops": {"recompute_overhead": 0.0 if strategy == "none" else 0.2},
        "loss": {"final": loss[-1], "history": list(loss)},
        "time": {
            "tokens_per_s": tps,
            "tokens_per_step": 1024,
            "warmup_steps": 1,
            "step_s": [1024 / tps] * 8,
            "overhead": {
                "baseline": "none",
                "ratio": ratio,
                "ci95_low": ci[0],
                "ci95_high": ci[1],
                "rounds": 20,
            },
        },
    }


def rows_of(records: dict[str, dict]) -> list[dict]:
    rows = [aggregate.row_of(res, run) for run, res in records.items()]
    rows.sort(key=aggregate._sort_key)
    aggregate.pair_with_baselines(rows)
    aggregate.replicate_intervals(rows)
    return rows


def test_prediction_interval_arithmetic():
    vals = [1.2, 1.3, 1.25]
    logs = [math.log(v) for v in vals]
    m = sum(logs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / 2)
    half = 4.303 * sd * math.sqrt(1 + 1 / 3)  # t(0.975, 2 df)
    c, lo, hi = prediction_interval(vals)
    assert c == pytest.approx(math.exp(m))
    assert lo == pytest.approx(math.exp(m - half)) and hi == pytest.approx(math.exp(m + half))
    assert prediction_interval([1.5]) == (pytest.approx(1.5), None, None)
    assert prediction_interval([1.1, 1.1, 1.1]) == (pytest.approx(1.1),) * 3
    with pytest.raises(ValueError):
        prediction_interval([1.0, -1.0])


def test_prediction_interval_covers_a_fresh_replicate_95_percent_of_the_time():
    """Replicate ratios log-normal around a true overhead: the interval from 3 replicates holds a
    4th, fresh one in about 95% of trials (a min-max range of 3 would hold it in 50%)."""
    rng = random.Random(0)
    trials, hits, in_range = 4000, 0, 0
    for _ in range(trials):
        draws = [math.exp(rng.gauss(math.log(1.3), 0.1)) for _ in range(4)]
        _, lo, hi = prediction_interval(draws[:3])
        hits += lo <= draws[3] <= hi
        in_range += min(draws[:3]) <= draws[3] <= max(draws[:3])
    assert 0.93 <= hits / trials <= 0.97
    assert in_range / trials < 0.6


def test_replicates_get_one_between_replicate_interval_beside_their_own():
    recs = {f"r{i}/none": record("none", 1.0, (1.0, 1.0)) for i in range(3)}
    ratios = (1.30, 1.45, 1.38)
    for i, r in enumerate(ratios):
        recs[f"r{i}/full"] = record("full", r, (r - 0.05, r + 0.05), tps=800 + 10 * i)
    rows = rows_of(recs)
    full = [r for r in rows if r["strategy"] == "full"]
    c, lo, hi = prediction_interval(list(ratios))
    for r in full:
        assert r["replicates"] == 3
        assert r["time_overhead_rep"] == pytest.approx(c - 1)
        assert (r["time_overhead_rep_low"], r["time_overhead_rep_high"]) == (
            pytest.approx(lo - 1),
            pytest.approx(hi - 1),
        )
        assert r["time_overhead_ci_high"] - r["time_overhead_ci_low"] == pytest.approx(0.1)
    assert full[0]["tokens_per_s_rep"] == pytest.approx(prediction_interval([800, 810, 820])[0])
    assert full[0]["device"] == "cpu (x86_64, 1 thread)"
    tr = derive.tradeoffs(rows)
    assert [t["strategy"] for t in tr] == ["full"]
    assert sorted(o for o, _, _ in tr[0]["within_run"]) == pytest.approx(
        sorted(r - 1 for r in ratios)
    )
    none = [r for r in rows if r["strategy"] == "none"]
    assert none[0]["time_overhead_rep"] == 0.0  # by definition, not an interval
    text = aggregate.fmt_rep_overhead(full[0])
    assert "95% PI" in text and "3 processes" in text
    # a single run has no between-replicate interval: it says n/a, never borrows the in-run one
    one = rows_of({"a/none": record("none", 1.0, (1.0, 1.0)), "a/full": record("full", 1.3)})
    assert aggregate.fmt_rep_overhead([r for r in one if r["strategy"] == "full"][0]) == "n/a"


def test_tables_name_both_intervals_and_escape_latex(tmp_path):
    recs = {f"r{i}/none": record("none", 1.0, (1.0, 1.0)) for i in range(3)}
    for i, r in enumerate((1.3, 1.4, 1.35)):
        recs[f"r{i}/full_x%"] = record("full", r, (r - 0.05, r + 0.05))
    rows = rows_of(recs)
    aggregate.write_markdown(rows, tmp_path / "summary.md")
    tables.write_summary_tex(rows, tmp_path / "summary.tex")
    tables.write_tradeoff(rows, tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "between replicates (95% PI)" in md and "within run (paired, 95% CI)" in md
    for name in ("summary.tex", "tradeoff.tex"):
        tex = (tmp_path / name).read_text()
        assert r"\toprule" in tex and r"\bottomrule" in tex and "between replicates" in tex
        assert "within run" in tex
    assert r"full\_x\%" in (tmp_path / "summary.tex").read_text()
    assert "time_overhead_rep_low" in (tmp_path / "tradeoff.csv").read_text()
    assert tables.tex("a_b & c%") == r"a\_b \& c\%"


def test_every_strategy_has_its_own_colour_and_marker():
    names = sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml"))
    labels = names + [
        "selective[attn]",
        "selective[mlp]",
        "selective[norm]",
    ]
    labels.remove("selective")  # its default label is selective[core_attn]
    labels.append("selective[core_attn]")
    styles = [style.strategy_style(x) for x in labels]
    assert len({c for c, _ in styles}) == len(labels), "two strategies share a colour"
    assert len({m for _, m in styles}) == len(labels), "two strategies share a marker"
    assert style.strategy_style("layers(method=block,num_layers=2)") == style.strategy_style(
        "layers"
    )


def test_what_fits_tex_states_total_gpus(tmp_path):
    md = ROOT / "experiments" / "figures" / "what_fits.md"
    path = tables.write_what_fits_tex(md, tmp_path / "what_fits.tex")
    tex = path.read_text()
    assert "GPUs total (x8 FSDP)" in tex
    # the 70B 8k full row on h100: 4 GPUs per replica -> 32 in total
    assert "llama3\\_70b & 8k & h100\\_80gb & full & 4 & 32 &" in tex
    assert tables.write_what_fits_tex(tmp_path / "absent.md", tmp_path / "x.tex") is None


def _estimate(model: str, strategy: str, seq: int, peak: int) -> dict:
    return {
        "config": {
            "model": {"name": model, "n_layer": 2 if model == "tiny" else 6},
            "strategy": {"name": strategy},
            "precision": {"name": "fp32"},
            "data": {"seq_len": seq, "batch_size": 8},
            "estimate": {"out": "estimate.json"},
        },
        "target": "cuda",
        "model": {"params": 100},
        "memory": {
            "model_state_bytes": {"predicted": 1600},
            "activation_bytes": {"predicted": 10 * seq, "korthikanti": 20 * seq},
            "peak_bytes": {"predicted": peak, "phase": "backward_start"},
        },
        "series": [],
    }


def test_analyze_tables_a_sweep_of_estimates(tmp_path):
    from recompute_lab.cli.analyze import main

    sweep = tmp_path / "sw"
    i = 0
    for model in ("tiny", "small"):
        for strategy in ("none", "full"):
            job = sweep / f"{i}_job"
            job.mkdir(parents=True)
            (job / "estimate.json").write_text(json.dumps(_estimate(model, strategy, 64, 1000 + i)))
            i += 1
    assert main([str(sweep), "--out", str(tmp_path / "an")]) == 0
    md = (tmp_path / "an" / "estimates.md").read_text()
    assert "| model | strategy | b |" in md and "nothing measured" in md.replace("N", "n")
    lines = (tmp_path / "an" / "estimates.csv").read_text().splitlines()
    assert lines[0].startswith("model,strategy,batch_size,params")
    assert [ln.split(",")[:2] for ln in lines[1:]] == [
        ["small", "full"],
        ["small", "none"],
        ["tiny", "full"],
        ["tiny", "none"],
    ]
    assert r"\toprule" in (tmp_path / "an" / "estimates.tex").read_text()
    # an empty folder is still refused
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2

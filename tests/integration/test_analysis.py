"""Sweep analysis: a real small multirun (tiny, none/full x two seq_lens) analysed by the CLI and
the Hydra
callback; every number quiz.md quotes is recomputed here straight from the results.json files."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recompute_lab.analysis import aggregate, derive
from recompute_lab.cli.callbacks import AnalyzeOnMultirunEnd
from recompute_lab.analysis.figures import FIGURES

from conftest import ROOT, FAST_TIMED, run_cli

SEQ_LENS = (32, 64)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real multirun through the CLI; the callback (on by default) analyses it into
    SWEEP/analysis."""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = run_cli(
        [
            "-m",
            "+strategy=none,full",
            f"data.seq_len={','.join(map(str, SEQ_LENS))}",
            "trainer.steps=3",
            "trainer.warmup_steps=1",
            *FAST_TIMED,
            # the quiz quotes full's paired overhead, which needs its 6 rounds and no more
            "trainer.overhead.max_rounds=6",
            "hydra.callbacks.analyze.formats=[png,pdf]",  # the suite's default is png alone
            f"hydra.sweep.dir={tmp / 'sw'}",
        ],
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "sw"


def results_of(sweep_dir: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(sweep_dir)): json.loads(p.read_text())
        for p in sweep_dir.rglob("results.json")
    }


def test_callback_analysed_the_multirun(sweep):
    out = sweep / "analysis"
    assert (out / "summary.csv").is_file() and (out / "quiz.md").is_file()
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").stat().st_size > 0


def test_cli_writes_csv_figures_quiz(sweep, tmp_path):
    out = tmp_path / "an"
    proc = run_cli(
        [str(sweep), "--out", str(out), "--formats", "png,pdf"],
        cwd=tmp_path,
        module="recompute_lab.analyze",
    )
    assert proc.returncode == 0, proc.stderr
    assert "analysed 4 runs (0 not ok)" in proc.stdout
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert sorted((r["strategy"], int(r["seq_len"])) for r in rows) == sorted(
        (s, n) for s in ("none", "full") for n in SEQ_LENS
    )
    for r in rows:  # every run is paired with the `none` run of its own seq_len
        base = next(b for b in rows if b["run"] == r["baseline"])
        assert base["strategy"] == "none" and base["seq_len"] == r["seq_len"]
    for name in FIGURES:
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    assert (out / "summary.md").read_text().count("| ok |") == 4


def test_figure_formats_are_asked_for_and_bad_ones_refused_before_writing(
    sweep, tmp_path, monkeypatch
):
    """The figure files: --formats, the callback's formats, else $RECOMPUTE_LAB_FIGURE_FORMATS,
    else png and pdf (the two fixtures above ask for both and find both). An unknown format is
    refused naming the valid ones, before anything is written."""
    from recompute_lab.analysis import FORMATS, FORMATS_ENV, figure_formats

    assert figure_formats(None) == ("png",)  # the suite's own setting (conftest)
    monkeypatch.delenv(FORMATS_ENV)
    assert figure_formats(None) == FORMATS == ("png", "pdf")
    monkeypatch.setenv(FORMATS_ENV, "pdf")
    assert figure_formats(None) == ("pdf",) and figure_formats(["png"]) == ("png",)
    assert figure_formats("PDF, png,pdf") == ("pdf", "png")
    for bad in ("svg", "", ["png", "eps"]):
        with pytest.raises(ValueError, match="choose one or more of png, pdf"):
            figure_formats(bad)
    proc = run_cli(
        [str(sweep), "--out", str(tmp_path / "f"), "--formats", "png,svg"],
        cwd=tmp_path,
        module="recompute_lab.analyze",
    )
    assert proc.returncode == 2 and "choose one or more of png, pdf" in proc.stderr
    assert not (tmp_path / "f").exists()
    bad = run_cli(
        ["-m", "trainer.steps=1", *FAST_TIMED, "hydra.callbacks.analyze.formats=[svg]"],
        cwd=tmp_path,
    )
    assert bad.returncode != 0 and "choose one or more of png, pdf" in bad.stderr
    assert not (tmp_path / "multirun").exists()  # refused before any job ran


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def test_quiz_numbers_equal_recomputed_values(sweep, tmp_path):
    """Recompute every number quiz.md quotes from the raw results.json files, independently of
    aggregate. The quiz is the one the callback wrote at the sweep's end (analyze(sweep), as the
    callback calls it: a second analysis here would only draw the same figures again)."""
    quiz = (sweep / "analysis" / "quiz.md").read_text()
    res = results_of(sweep)
    by = {
        (r["config"]["strategy"]["name"], r["model"]["seq_len"]): (run, r) for run, r in res.items()
    }
    s = max(SEQ_LENS)
    run_full, full = by[("full", s)]
    _, none = by[("none", s)]
    ps = full["flops"]["per_step"]
    assert f"**{_pct(ps['recompute'] / (ps['forward'] + ps['backward']))} more FLOPs**" in quiz
    assert f"row `{aggregate.run_label(run_full)}`" in quiz
    o = full["time"]["overhead"]  # the run's own paired measurement, with its interval
    assert o["baseline"] == "none" and o["rounds"] >= 6 and none["time"]["overhead"]["rounds"] == 0
    lo, hi, r = o["ci95_low"] - 1, o["ci95_high"] - 1, o["ratio"] - 1
    time_words = (
        f"within noise (+-{100 * max(-lo, hi):.1f}%)"
        if lo <= 0 <= hi
        else f"{100 * r:+.1f}% (95% CI {100 * lo:+.1f}% to {100 * hi:+.1f}%)"
    )
    assert (
        f"; step time {time_words} (within run; no replicates) "
        f"(row `{aggregate.run_label(run_full)}`)" in quiz
    )
    bpp = res[sorted(res)[0]]["memory"]["model_state_bytes"]
    assert bpp["measured"] == 16 * res[sorted(res)[0]]["model"]["params"]
    assert (
        f"**{bpp['measured'] / res[sorted(res)[0]]['model']['params']:.1f} B/param**" in quiz
    )  # 16.0, not 12

    act = {k: v[1]["memory"]["activation_bytes"].get("measured") for k, v in by.items()}
    if (
        act[("none", s)] is None
    ):  # before the memory probe: the quiz must say what is missing, not invent it
        assert "activation saving n/a (memory.activation_bytes missing)" in quiz
        assert "Not answerable from this sweep" in quiz
        return
    saved = act[("none", s)] - act[("full", s)]
    assert (
        f"**{_pct(saved / act[('none', s)])} less activation memory** "
        f"({aggregate.fmt_bytes(saved)})" in quiz
    )

    def blocks(key):  # saved bytes without the fp32 logits
        a = by[key][1]["memory"]["activation_bytes"]
        return a["measured"] - (a.get("logits") or {}).get("measured", 0)

    lo, hi = min(SEQ_LENS), max(SEQ_LENS)
    b = none["model"]["batch_size"]
    slope = (blocks(("none", hi)) - blocks(("none", lo))) / ((hi - lo) * b)
    assert f"**{slope:.1f} B per token**" in quiz
    naive = 2 * 2 * none["model"]["d_model"] * hi * b * none["model"]["n_layer"]
    assert f"**{blocks(('none', hi)) / naive:.1f}x**" in quiz
    peak = {st: by[(st, hi)][1]["memory"]["peak_bytes"]["measured"] for st in ("none", "full")}
    if peak["full"] is not None and peak["full"] < peak["none"]:
        assert (
            f"at least **{aggregate.fmt_bytes(peak['full'])}** and below "
            f"**{aggregate.fmt_bytes(peak['none'])}**" in quiz
        )


def test_failed_run_is_still_analysed(sweep, tmp_path):
    copy = tmp_path / "sw"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("analysis"))
    victim = next(p for p in sorted(copy.rglob("results.json")) if "strategy=full" in str(p))
    res = json.loads(victim.read_text())
    res.update(status="oom", error="CUDA out of memory. Tried to allocate 2.00 GiB")
    res["time"] = {"step_s_median": None, "step_s": []}
    victim.write_text(json.dumps(res))
    (copy / "broken").mkdir()
    (copy / "broken" / "results.json").write_text("{not json")
    proc = run_cli(
        [str(copy), "--out", str(tmp_path / "an")], cwd=tmp_path, module="recompute_lab.analyze"
    )
    assert proc.returncode == 0, proc.stderr
    assert "(2 not ok)" in proc.stdout and ": oom CUDA out of memory" in proc.stdout
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "an" / "summary.csv").open())}
    failed = rows[str(victim.parent.relative_to(copy))]
    assert failed["status"] == "oom" and failed["error"].startswith("CUDA out of memory")
    assert (
        failed["time_overhead"]
        == failed["time_overhead_ci_low"]
        == failed["baseline"]
        == failed["step_s_min"]
        == ""
    )
    assert rows["broken"]["status"] == "unreadable"
    md = (tmp_path / "an" / "summary.md").read_text()
    assert "**oom** — CUDA out of memory" in md
    assert "2 not ok (oom, unreadable)" in (tmp_path / "an" / "quiz.md").read_text()


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: p / "missing", "no such folder"),
        (lambda p: p, "no results.json found"),
        (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "not a folder"),
    ],
)
def test_empty_or_wrong_folder_is_a_clear_error(tmp_path, make, needle):
    target = make(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "recompute_lab.analyze", str(target), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing half-written


def test_callback_switch_and_failure_is_only_a_warning(tmp_path, caplog):
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    AnalyzeOnMultirunEnd(enabled=False).on_multirun_end(cfg)
    assert not (tmp_path / "analysis").exists()
    with caplog.at_level(logging.WARNING):
        AnalyzeOnMultirunEnd().on_multirun_end(
            cfg
        )  # empty sweep: analysis fails, the sweep does not
    assert "analysis of" in caplog.text and "no results.json" in caplog.text
    conf = OmegaConf.load(ROOT / "conf" / "config.yaml")
    assert (
        conf.hydra.callbacks.analyze._target_ == "recompute_lab.cli.callbacks.AnalyzeOnMultirunEnd"
    )


def test_baseline_matching_and_frontier():
    cfg = {
        "model": {"name": "tiny"},
        "trainer": {"progress": True, "steps": 3},
        "logger": {"kind": "wandb"},
        "strategy": {"name": "full"},
    }
    other = json.loads(json.dumps(cfg))
    other.update(strategy={"name": "none"}, logger={"kind": "none"})
    other["trainer"]["progress"] = False
    assert aggregate.match_key(cfg) == aggregate.match_key(other)
    other["trainer"]["steps"] = 4
    assert aggregate.match_key(cfg) != aggregate.match_key(other)
    # (overhead, saving): (0.3, 0.5) is dominated by (0.2, 0.6)
    pts = [(0.0, 0.0), (0.3, 0.5), (0.2, 0.6), (0.4, 0.9)]
    assert derive.pareto_frontier(pts) == [0, 2, 3]
    assert (
        aggregate.strategy_label({"name": "selective", "modules": ["attn", "mlp"]})
        == "selective[attn+mlp]"
    )


def _result(strategy: str, overhead: dict | None, contended: str | None = None) -> dict:
    cfg = {
        "model": {"name": "tiny", "attention": "eager"},
        "precision": {"name": "fp32"},
        "data": {"seq_len": 64},
        "strategy": {"name": strategy},
        "trainer": {"steps": 4},
    }
    return {
        "schema_version": 1,
        "status": "ok",
        "config": cfg,
        "model": {"seq_len": 64, "batch_size": 8},
        "memory": {"activation_bytes": {"measured": 1000 if strategy == "none" else 400}},
        "flops": {
            "per_step": {"forward": 10, "backward": 20, "recompute": 3},
            "recompute_overhead": 0.1,
        },
        "time": {
            "step_s": [0.1] * 4,
            "warmup_steps": 1,
            "step_s_median": 0.1,
            "overhead": overhead,
            "contended": contended is not None,
            "contended_reason": contended,
        },
    }


def test_time_overheads_are_paired_intervals_and_noise_is_called_noise(tmp_path):
    """Time columns come from each run's paired time.overhead; an interval containing 0 reads
    'within noise'; a
    contended run's time is not used; nothing is derived from two runs' separate step times."""

    def overhead(ratio, lo, hi, baseline="none"):
        return {
            "baseline": baseline,
            "ratio": ratio,
            "ci95_low": lo,
            "ci95_high": hi,
            "rounds": 8,
            "baseline_step_s": 0.01,
            "method": "m",
            "skipped": None,
        }

    runs = {
        "none": _result("none", {**overhead(1.0, 1.0, 1.0), "rounds": 0}),
        "full": _result("full", overhead(1.25, 1.2, 1.31)),
        "selective": _result("selective", overhead(1.02, 0.97, 1.08)),
        "sqrt": _result(
            "sqrt", overhead(1.4, 1.3, 1.5), contended="joblib launcher (n_jobs=2): ..."
        ),
        "layers": _result("layers", None),
    }
    runs["full"]["time"]["step_s_median"] = (
        0.001  # a separate run's time would say -99%: must not be used
    )
    for name, res in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    rows = {r["_strategy_name"]: r for r in aggregate.load_rows(tmp_path)}
    assert rows["full"]["time_overhead"] == pytest.approx(0.25) and rows["full"][
        "time_overhead_ci_low"
    ] == pytest.approx(0.2)
    assert aggregate.fmt_overhead(rows["full"]) == "+25.0% (95% CI +20.0% to +31.0%)"
    assert aggregate.fmt_overhead(rows["selective"]) == "within noise (+-8.0%)"
    assert aggregate.fmt_overhead(rows["none"]) == "+0.0% (by definition)"
    assert rows["sqrt"]["time_overhead"] is None and "time not used: joblib" in rows["sqrt"]["note"]
    assert (
        rows["layers"]["time_overhead"] is None and aggregate.fmt_overhead(rows["layers"]) == "n/a"
    )
    tr = {t["strategy"].split("[")[0]: t for t in derive.tradeoffs(list(rows.values()))}
    assert derive.interval_contains_zero(tr["selective"]) and not derive.interval_contains_zero(
        tr["full"]
    )
    from recompute_lab.analysis import quiz

    text = "\n".join(quiz.q2_tradeoff(list(rows.values())))
    assert (
        "step time within noise (+-8.0%) (within run; no replicates)" in text
        and "step time +25.0% (95% CI +20.0% to +31.0%) (within run; no replicates)" in text
    )
    assert "not used (contended: joblib" in text and "no paired measurement in this run" in text
    aggregate.write_markdown(list(rows.values()), tmp_path / "summary.md")
    md = (tmp_path / "summary.md").read_text()
    assert "within noise (+-8.0%)" in md and "n/a (contended)" in md and "-99" not in md
    from recompute_lab.analysis.figures import fig_pareto

    assert fig_pareto(list(rows.values()), tmp_path)[0].stat().st_size > 0


@pytest.mark.slow
def test_reproduce_figures_command(tmp_path):
    """The documented one-command reproduction: every figure, twice identical CSVs apart from
    timing. Each reproduction runs the timed sweeps in 3 replicate processes: about 17 min on 2
    shared cores (reproduce_figures' docstring), hence the bounds."""
    outs = []
    for i in range(2):
        t = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "experiments/reproduce_figures.py",
                "--out",
                str(tmp_path / f"o{i}"),
                "--runs",
                str(tmp_path / f"r{i}"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=3000,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert time.perf_counter() - t < 2400
        for name in FIGURES:
            assert (tmp_path / f"o{i}" / f"{name}.png").is_file()
        rows = list(csv.DictReader((tmp_path / f"o{i}" / "summary.csv").open()))
        outs.append(
            [{k: v for k, v in r.items() if k not in aggregate.TIMING_COLUMNS} for r in rows]
        )
    assert outs[0] == outs[1] and all(r["status"] == "ok" for r in outs[0])


def test_quiz_compares_the_seed_line_at_matched_dtype():
    """The 2·2·h line assumes 16-bit values: quiz.md gives the same model's ratio in bf16 too, which
    is checked here
    against a bf16 model's measured saved bytes (not the theory the quiz quotes)."""
    import torch

    from recompute_lab.predict import theory
    from recompute_lab.analysis.quiz import matched_regime
    from recompute_lab.config import ModelConfig
    from recompute_lab.measure.memory import saved_tensors
    from recompute_lab.model.gpt import build_model

    s, b = 64, 2
    model_cfg = {
        "n_layer": 2,
        "d_model": 64,
        "n_head": 4,
        "d_ff": 256,
        "vocab_size": 256,
        "max_seq_len": 64,
        "attention": "eager",
        "dropout": 0.0,
    }
    point = {
        "seq_len": s,
        "tokens": s * b,
        "naive": 2 * theory.naive_layer_bytes(s, b, 64),
        "korthikanti": 2 * theory.korthikanti_layer_bytes(s, b, 64, 4),
    }
    text = matched_regime(("tiny", "fp32", "eager", b, json.dumps({"model": model_cfg})), point)
    model = build_model(ModelConfig(**model_cfg), dtype=torch.bfloat16).train()
    idx = torch.zeros(b, s, dtype=torch.long)
    counted = saved_tensors(model, lambda: model(idx, idx))
    logits = sum(t["nbytes"] for t in counted["tensors"] if t["op"] == "_log_softmax")
    assert (
        f"at matched dtype (bf16, dropout 0) the theory puts the same model at "
        f"**{(counted['total'] - logits) / point['naive']:.1f}x** the line" in text
    )
    assert "this run is fp32 with dropout 0" in text
    assert matched_regime(
        ("tiny", "bf16_master", "eager", b, json.dumps({"model": {**model_cfg, "dropout": 0.1}})),
        point,
    ).startswith(" This run is in the formulas' regime")
    assert matched_regime(("tiny", "fp32", "eager", b, "not json"), point) == ""

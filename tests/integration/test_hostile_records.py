"""One bad results.json must not stop the analysis of a sweep (issue 31): a record nested past
Python's recursion limit, "inf" where bytes belong, a FIFO named like the run folder's lock file.
Each costs only its own row (status unreadable, or its measurements n/a)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from recompute_lab.cli.analyze import analyze
from recompute_lab.config import ConfigError
from recompute_lab.record.folder import LOCK, RunFolder, is_locked

from conftest import ROOT, run_cli

RECORDS = ROOT / "tests" / "data" / "records"


def _sweep(tmp_path: Path, bad: dict | str | None = None, **others: dict | str) -> Path:
    """A sweep folder of the committed records plus one run ``bad`` (a record, or raw text), and
    one more run per keyword (its folder name)."""
    sweep = tmp_path / "sweep"
    for path in RECORDS.glob("*.json"):
        (sweep / path.stem).mkdir(parents=True)
        (sweep / path.stem / "results.json").write_text(path.read_text())
    runs = {**({"bad": bad} if bad is not None else {}), **others}
    for name, record in runs.items():
        (sweep / name).mkdir()
        text = record if isinstance(record, str) else json.dumps(record)
        (sweep / name / "results.json").write_text(text)
    return sweep


def _record() -> dict:
    return json.loads((RECORDS / "regions_fp32_eager.json").read_text())


def _inf(obj):
    """Every number of ``obj`` as the writer's "inf"."""
    if isinstance(obj, dict):
        return {k: _inf(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_inf(v) for v in obj]
    return "inf" if isinstance(obj, (int, float)) and not isinstance(obj, bool) else obj


def _deep(depth: int) -> str:
    return json.dumps(_record())[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """One analysis (tables, every figure, quiz) of the committed records beside every hostile
    record of the tests below, each in its own run folder: any of them stopping the analysis fails
    them all, and each test checks its own row. (One analysis instead of four: drawing the figures
    is most of an analysis' time.)"""
    inf = _record()
    inf.update({k: _inf(inf[k]) for k in ("memory", "flops", "time")})
    diverged = _record()
    diverged["loss"] = {**diverged["loss"], "final": "inf"}
    sweep = _sweep(
        tmp_path_factory.mktemp("hostile"),
        deep900=_deep(900),
        deep5000=_deep(5000),
        inf=inf,
        diverged=diverged,
    )
    return analyze(sweep)  # matplotlib used to refuse the inf record: "Axis limits ... Inf"


@pytest.mark.parametrize("depth", [900, 5000])
def test_deeply_nested_record_is_one_unreadable_row(hostile, depth):
    """900 levels parse but overflow the analysis' own recursion; 5000 overflow the parser."""
    bad = [r for r in hostile["rows"] if r["run"] == f"deep{depth}"]
    assert bad[0]["status"] == "unreadable" and f"deep{depth}/results.json" in bad[0]["error"]
    # every committed record still reads ok (the sweep's other runs: inf and diverged, ok too)
    committed = {p.stem for p in RECORDS.glob("*.json")}
    assert sum(r["status"] == "ok" for r in hostile["rows"] if r["run"] in committed) == len(
        committed
    )


def test_inf_bytes_flops_and_times_read_as_missing(hostile):
    row = next(r for r in hostile["rows"] if r["run"] == "inf")
    assert row["status"] == "ok" and row["peak_bytes_measured"] is None
    assert row["act_bytes_measured"] is None and row["step_s_median"] is None
    assert all(f.is_file() for f in hostile["files"])


def test_a_diverged_runs_inf_loss_is_kept(hostile):
    row = next(r for r in hostile["rows"] if r["run"] == "diverged")
    assert row["final_loss"] == float("inf")


class Hung(BaseException):
    """Raised by _deadline: a BaseException, so no ``except OSError`` / ``except Exception`` in the
    code under test can take it for an ordinary failure."""


@contextlib.contextmanager
def _deadline(seconds: int, what: str):
    """Fail with Hung instead of hanging the test session."""

    def stuck(signum, frame):
        raise Hung(f"{what} blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fifo_named_like_the_lock_does_not_hang_the_analysis(tmp_path):
    sweep = _sweep(tmp_path, {**_record(), "status": "running"})
    os.mkfifo(sweep / "bad" / LOCK)
    with _deadline(20, "is_locked on a FIFO"):
        assert is_locked(sweep / "bad") is False  # no run of ours holds a FIFO
    # a subprocess, so that a regression times out instead of hanging the test session
    proc = run_cli([str(sweep)], cwd=tmp_path, module="recompute_lab.cli.analyze", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bad: killed" in proc.stdout + proc.stderr


def test_fifo_named_results_json_does_not_hang_the_tally(tmp_path):
    from recompute_lab.cli.callbacks import tally

    sweep = _sweep(tmp_path, _record())
    (sweep / "fifo").mkdir()
    os.mkfifo(sweep / "fifo" / "results.json")
    n = len(list(RECORDS.glob("*.json"))) + 1
    with _deadline(20, "the sweep tally on a FIFO"):
        assert tally(sweep) == (f"{n + 1} jobs: {n} ok, 1 unreadable", 1)
        assert len(analyze(sweep)["rows"]) == n  # find_results reads regular files only


def test_fifo_lock_refuses_a_run_instead_of_hanging(tmp_path):
    os.mkfifo(tmp_path / LOCK)
    with _deadline(20, "RunFolder.acquire on a FIFO"):
        with pytest.raises(ConfigError, match="not a regular file"):
            RunFolder(tmp_path).acquire()
    assert not (tmp_path / "results.json").exists()


def test_summary_csv_text_cells_cannot_be_formulas(tmp_path):
    """Text from records (run names, errors, notes) starting with = + - @ is escaped with a leading
    quote; numbers, negative ones included, stay numbers (issue 31)."""
    import csv

    from recompute_lab.analysis.aggregate import COLUMNS, write_csv

    hostile = {
        "run": '=HYPERLINK("http://x")',
        "status": "error",
        "error": "+cmd|' /C calc'!A0",
        "note": "@SUM(A1)",
        "strategy": "-1+2",
        "model": "tiny",
        "time_overhead": -0.05,
        "seq_len": 64,
    }
    row = {**dict.fromkeys(COLUMNS), **hostile}
    write_csv([row], tmp_path / "summary.csv")
    (cell,) = csv.DictReader((tmp_path / "summary.csv").open())
    assert cell["run"] == "'=HYPERLINK(\"http://x\")" and cell["error"].startswith("'+cmd")
    assert cell["note"] == "'@SUM(A1)" and cell["strategy"] == "'-1+2" and cell["model"] == "tiny"
    assert cell["time_overhead"] == "-0.05" and cell["seq_len"] == "64"

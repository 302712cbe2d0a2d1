"""experiments/cpu_time_check.py: the committed table (the step-time model on this CPU beside
the committed runs' paired time overheads) is what the code computes now from the committed
calibration, and docs/planning.md quotes its summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import cpu_time_check as ct  # noqa: E402
from docs_text import page  # noqa: E402


def test_committed_table_is_fresh():
    cal = json.loads(ct.CALIBRATION.read_text())
    rows = ct.predict(cal)
    assert ct.OUT.read_text() == ct.table(cal, rows)
    timed = [r for r in rows if r["predicted"] is not None]
    assert len(timed) >= 6  # none, selective (four module sets) and full, three precisions
    for r in timed:
        assert r["inside"] == (r["low"] <= r["predicted"] <= r["high"])


def test_planning_page_quotes_the_summary():
    text = " ".join(page("planning").split())
    for part in ct.OUT.read_text().split("\n\n")[2:4]:  # the summary, the errors by strategy
        assert " ".join(part.split()) in text


def test_every_strategy_of_the_committed_runs_is_timed():
    """op-SAC, regions and offload included: nothing is left 'not timed by the model'."""
    rows = ct.predict(json.loads(ct.CALIBRATION.read_text()))
    assert all(r["predicted"] is not None for r in rows), [r["strategy"] for r in rows]
    names = set(ct.by_strategy(rows))
    assert {"op", "regions", "offload", "full", "layers", "sqrt"} <= names

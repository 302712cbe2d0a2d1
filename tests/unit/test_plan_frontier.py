"""experiments/plan_frontier.py: the committed CSV is what the advisor predicts now, and its
frontier is the fitting candidates no other fitting candidate beats on tokens/s and memory."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import plan_frontier as pf  # noqa: E402


def test_committed_csv_is_fresh_and_the_frontier_undominated():
    data = pf.rows()
    assert (pf.OUT / "plan_frontier.csv").read_text() == pf.to_csv(data)
    assert (pf.OUT / "plan_frontier.png").is_file()
    front = [r for r in data if r["frontier"]]
    fitting = [r for r in data if r["fits"]]
    assert front and all(r["fits"] for r in front)
    best = max(fitting, key=lambda r: r["tokens_per_s_per_gpu"])
    assert best["frontier"]  # the advisor's winner is on it
    for r in fitting:
        if not r["frontier"]:  # something on the frontier is at least as fast with no more memory
            assert any(
                f["tokens_per_s_per_gpu"] >= r["tokens_per_s_per_gpu"]
                and f["peak_gib"] <= r["peak_gib"]
                for f in front
            )

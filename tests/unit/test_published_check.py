"""experiments/published_check.py: the committed table of published results vs the step-time
model is what the code computes now, it predicts at least five results from their stated
configurations, and every entry it does not predict says why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import published_check as pc  # noqa: E402
from docs_text import page  # noqa: E402


def test_committed_table_is_fresh():
    rows, skipped = pc.check(json.loads(pc.DATA.read_text()))
    assert len(rows) >= 5
    assert pc.OUT.read_text() == pc.table(rows, skipped)
    assert all(s["reason"] for s in skipped)
    entries = json.loads(pc.DATA.read_text())
    assert len(rows) + len(skipped) == len(entries)
    assert all(e["source"] for e in entries)  # every figure cites where it comes from


def test_error_is_in_throughput():
    """Seconds and throughputs share one sign: a faster predicted step is a positive error."""
    e = {"published": {"iteration_s": 2.0}, "id": "x", "n_gpus": 1}
    metric, pub, ours = pc.compare(e, {"step_s": 1.0}, None)
    assert (metric, pub, ours) == ("iteration s", 2.0, 1.0)
    rows, _ = pc.check(json.loads(pc.DATA.read_text()))
    for r in rows:
        want = (r["published"] / r["ours"] if r["metric"] == "iteration s"
                else r["ours"] / r["published"]) - 1
        assert r["error"] == want


def test_planning_page_quotes_the_table():
    rows, _ = pc.check(json.loads(pc.DATA.read_text()))
    text = page("planning")
    for line in pc.by_card(rows):
        assert line in text, f"docs/planning.md should read: {line}"


def test_readme_states_the_median_and_worst_error_of_each_check():
    """README's one line on the step-time model's error is both committed checks' summaries."""
    import re

    import cpu_time_check as ct

    readme = " ".join((ROOT / "README.md").read_text().split())
    rows, _ = pc.check(json.loads(pc.DATA.read_text()))
    for line in pc.by_card(rows):
        assert " ".join(line.removeprefix("- ").split()) in readme
    summary = ct.OUT.read_text().split("\n\n")[2]
    n, med, worst = re.search(
        r"(\d+) strategies timed: .*?median error ([-+\d.]+%).*?worst ([-+\d.]+%)", summary
    ).groups()
    assert f"this CPU ({n} strategies timed, median error {med}, worst {worst})" in readme

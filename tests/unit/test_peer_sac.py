"""experiments/peer_sac.py: the committed table's arithmetic and its "where each wins" lines follow
from its own numbers (fast, no torch tools run); the tiny b4 s64 rows, both plans measured again,
equal the committed ones (about 20 s); the whole table regenerates exactly (slow). The last two
need pulp (sac_milp's solver) and pwlf (SACEstimator's fit): the `peers` extra."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import peer_sac as ps  # noqa: E402

MISSING = [m for m in ("pulp", "pwlf") if importlib.util.find_spec(m) is None]
needs_peers = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{', '.join(MISSING)} not installed: sac_milp needs pulp and SACEstimator's fit needs "
    "pwlf (pip install -e '.[peers]')",
)


def committed() -> list[dict]:
    return ps.parse(ps.OUT.read_text())


def test_table_arithmetic():
    rows = committed()
    assert len(rows) == len(ps.SHAPES) * len(ps.FRACTIONS) * len(ps.SIDES)
    for r in rows:
        assert r["budget"] == int(r["fraction"] * r["none_bytes"])
        assert r["met"] == ps.met(r)  # 'met' is measured <= budget, nothing else
        if r["measured_bytes"] is None:
            assert r["plan"] == "infeasible" and r["measured_recompute"] is None
        else:
            assert r["measured_recompute"] >= 0
    # the prose and every derived figure are what table() computes from the rows
    assert ps.table(rows) == ps.OUT.read_text()


def test_winner_rules():
    def row(side, measured, recompute, budget=100):
        return {
            "side": side,
            "measured_bytes": measured,
            "measured_recompute": recompute,
            "budget": budget,
        }

    assert ps.winner([row("sac_milp", 90, 5), row("budget", 90, 7)]) == "sac_milp"
    assert ps.winner([row("sac_milp", 101, 0), row("budget", 90, 7)]) == "budget"
    assert ps.winner([row("sac_milp", 90, 7), row("budget", 90, 7)]) == "tie"
    assert ps.winner([row("sac_milp", None, None), row("budget", 101, 1)]) == "neither"


@needs_peers
def test_tiny_rows_are_counted_again():
    """Every measured cell of one shape is what a fresh count gives: both plans are solved and
    applied again, activation bytes counted by saved tensors and FLOPs by FlopCounterMode."""
    model, b, s = ps.SHAPES[0]
    fresh = ps.shape_rows(model, b, s)
    mine = [r for r in committed() if r["case"] == f"{model} b{b} s{s}"]
    keys = (
        "side",
        "budget",
        "plan",
        "predicted_bytes",
        "measured_bytes",
        "measured_recompute",
        "predicted_recompute",
    )
    assert [{k: r[k] for k in keys} for r in fresh] == [{k: r[k] for k in keys} for r in mine]


@needs_peers
@pytest.mark.slow
def test_whole_table_regenerates():
    assert ps.table(ps.rows()) == ps.OUT.read_text()


def test_planning_page_quotes_where_each_wins():
    """docs/planning.md quotes the table's first four 'where each wins' lines as they are."""
    from docs_text import page

    wins = ps.OUT.read_text().split("## Where each wins")[1]
    bullets = [line for line in wins.splitlines() if line.startswith("- ")][:4]
    text = " ".join(page("planning").split())
    for line in bullets:
        assert " ".join(line.split()) in text

"""experiments/peer_runtime.py: our column of the committed table is what step_time computes now
(the fast check), and the whole table, PyTorch's RuntimeEstimator included, regenerates exactly
(slow: RuntimeEstimator walks every aten op of nine forward + backward passes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import peer_runtime as pr  # noqa: E402


def committed() -> list[list[str]]:
    lines = [ln for ln in pr.OUT.read_text().splitlines() if ln.startswith("| llama")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_our_column_is_fresh():
    cells = committed()
    assert len(cells) == len(pr.CASES) * len(pr.STRATEGIES)
    for (name, n_layer, b, s), i in zip(
        [c for c in pr.CASES for _ in pr.STRATEGIES], range(len(cells))
    ):
        case, strategy, theirs_ms, ours_ms, ratio = cells[i][:5]
        assert case == f"{name} x{n_layer} layers, b{b} s{s}"
        assert ours_ms == f"{pr.ours(name, n_layer, b, s, strategy) * 1e3:.2f}"
        assert abs(float(ours_ms) / float(theirs_ms) - float(ratio)) < 0.01


@pytest.mark.slow
def test_whole_table_regenerates():
    assert pr.OUT.read_text() == pr.table(pr.rows())

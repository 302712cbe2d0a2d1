"""The estimate and what-fits timings on docs/planning.md quote experiments/figures/bench_cli.md
(what bench_cli.py measured,
with its interval and load): a time figure is the committed measurement's, digit for digit."""

from __future__ import annotations

import re
from pathlib import Path

from docs_text import page

ROOT = Path(__file__).resolve().parents[2]


def row(table: str, entry: str, phase: str) -> tuple[str, str, str]:
    m = re.search(
        rf"^\| {entry} \| {phase} \| ([0-9.]+) \| ([0-9.]+-[0-9.]+) \| \d+ \| ([0-9.]+) ", table,
        re.M,
    )
    assert m, (entry, phase)
    return m.groups()


def test_readme_estimate_timing_is_the_bench_table():
    table = (ROOT / "experiments" / "figures" / "bench_cli.md").read_text()
    readme = " ".join(page("planning").split())
    work, work_ci, _ = row(table, "estimate_405b", "work")
    total, total_ci, load = row(table, "estimate_405b", "total")
    lo, hi = work_ci.split("-")
    tlo, thi = total_ci.split("-")
    assert f"work {work} s (95% CI {lo}-{hi}), {total} s ({tlo}-{thi}) with the imports" in readme
    assert f"at load {load} on the 2 shared cores" in readme


def test_readme_what_fits_timing_is_the_bench_table():
    table = (ROOT / "experiments" / "figures" / "bench_cli.md").read_text()
    total, ci, load = row(table, "what_fits", "total")
    lo, hi = ci.split("-")
    assert f"({total} s, 95% CI {lo}-{hi}, at load {load}; bench_cli.md)" in page("planning")

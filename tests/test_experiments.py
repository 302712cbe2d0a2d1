"""The benchmark and check scripts in experiments/ run (reduced) so they cannot rot; their tables are sane.

gpu_check's reduced mode runs by default; the two benchmark smoke tests are slow (-m slow).
"""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import ROOT


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_gpu_check_reduced(tmp_path):
    out = tmp_path / "gpu.csv"
    proc = run_script("gpu_check.py", "--reduced", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["strategy"] for r in rows] == ["none", "full", "selective", "op"]
    assert all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 for r in rows)
    overhead = {r["strategy"]: float(r["recompute_overhead"]) for r in rows}
    assert overhead["none"] == 0 < overhead["selective"] < overhead["full"]


@pytest.mark.slow
def test_bench_strategies_tiny(tmp_path):
    out = tmp_path / "b.csv"
    proc = run_script("bench_strategies.py", "--model", "tiny", "--seq-lens", "32", "--attention", "eager",
                      "--strategies", "none,full,selective", "--steps", "2", "--csv", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {r["strategy"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"none", "full", "selective"} and float(rows["none"]["time_overhead"]) == 1.0
    assert float(rows["full"]["recompute_flop_overhead"]) > float(rows["selective"]["recompute_flop_overhead"]) > 0
    bad = run_script("bench_strategies.py", "--strategies", "nope")
    assert bad.returncode != 0 and "valid" in bad.stderr


@pytest.mark.slow
def test_bench_overhead_tiny(tmp_path):
    out = tmp_path / "o.csv"
    proc = run_script("bench_overhead.py", "--repeats", "1", "--steps", "5", "--csv", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["strategy"] for r in rows] == ["none", "full"] and all(float(r["ratio_median"]) > 0 for r in rows)

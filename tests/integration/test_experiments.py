"""The benchmark and check scripts in experiments/ run (reduced) so they cannot rot; their tables
are sane.

gpu_check's reduced mode runs by default; the two benchmark smoke tests are slow (-m slow).
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import run_script as run_python_script


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_python_script(ROOT / "experiments" / name, list(args), cwd=ROOT, timeout=timeout)


def test_gpu_check_reduced(tmp_path):
    out = tmp_path / "gpu.csv"
    proc = run_script("gpu_check.py", "--reduced", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["strategy"] for r in rows] == ["none", "full", "selective", "op"]
    assert all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 for r in rows)
    overhead = {r["strategy"]: float(r["recompute_overhead"]) for r in rows}
    assert overhead["none"] == 0 < overhead["selective"] < overhead["full"]
    # the paired time overheads of full / selective / op against none, each with its interval
    time = {r["strategy"]: r for r in rows}
    assert (
        time["none"]["time_overhead"] == "1.0"
        and time["none"]["time_words"] == "+0.0% (by definition)"
    )
    for name in ("full", "selective", "op"):
        r = time[name]
        assert int(r["time_rounds"]) == 6 and float(r["time_ci95_low"]) <= float(
            r["time_overhead"]
        ) <= float(r["time_ci95_high"])
    assert "paired time overhead vs none" in proc.stdout
    # the step-time model calibrated on the device: a predicted step for the strategies it times
    assert "step time, measured vs predicted" in proc.stdout
    for name in ("none", "full", "selective", "op"):  # op-SAC from its save list
        assert float(time[name]["step_predicted_s"]) > 0
    assert float(time["none"]["overhead_predicted"]) == 1.0
    predicted = {k: float(time[k]["overhead_predicted"]) for k in ("full", "selective")}
    assert predicted["full"] > predicted["selective"]


@pytest.mark.slow
def test_bench_strategies_tiny(tmp_path):
    out = tmp_path / "b.csv"
    proc = run_script(
        "bench_strategies.py",
        "--model",
        "tiny",
        "--seq-lens",
        "32",
        "--attention",
        "eager",
        "--strategies",
        "none,full,selective",
        "--steps",
        "2",
        "--csv",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["strategy"]: r for r in csv.DictReader(out.open())}
    assert (
        set(rows) == {"none", "full", "selective"} and float(rows["none"]["time_overhead"]) == 1.0
    )
    assert rows["none"]["time_words"] == "+0.0% (by definition)"
    assert all(
        float(r["time_ci95_low"]) <= float(r["time_overhead"]) <= float(r["time_ci95_high"])
        for r in rows.values()
    )
    assert (
        float(rows["full"]["recompute_flop_overhead"])
        > float(rows["selective"]["recompute_flop_overhead"])
        > 0
    )
    bad = run_script("bench_strategies.py", "--strategies", "nope")
    assert bad.returncode != 0 and "valid" in bad.stderr


@pytest.mark.slow
def test_bench_overhead_tiny(tmp_path):
    out = tmp_path / "o.csv"
    proc = run_script(
        "bench_overhead.py", "--pairing", "runs", "--rounds", "1", "--steps", "5", "--csv", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["strategy"] for r in rows] == ["none", "full"] and all(
        float(r["ratio"]) > 0 for r in rows
    )
    assert all(
        r["ci95_low"] == "" and r["target"].startswith("undecided (no interval") for r in rows
    )
    proc = run_script(
        "bench_overhead.py", "--rounds", "6", "--strategies", "full", "--csv", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = list(csv.DictReader(out.open()))
    assert row["pairing"] == "steps" and float(row["ci95_low"]) <= float(row["ratio"]) <= float(
        row["ci95_high"]
    )
    assert row["target"].split()[0] in ("met", "missed", "undecided")


@pytest.mark.slow
def test_bench_time_vs_flops_tiny(tmp_path):
    out = tmp_path / "t.csv"
    proc = run_script(
        "bench_time_vs_flops.py",
        "--model",
        "tiny",
        "--seq-len",
        "32",
        "--max-rounds",
        "6",
        "--csv",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["strategy"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"full", "selective", "layers"}
    for r in rows.values():
        flop, ratio = float(r["flop_overhead"]), float(r["time_overhead"])
        assert flop > 0 and float(r["time_per_flop"]) == pytest.approx((ratio - 1) / flop)
        assert (
            float(r["time_per_flop_low"])
            <= float(r["time_per_flop"])
            <= float(r["time_per_flop_high"])
        )
    bad = run_script("bench_time_vs_flops.py", "--strategies", "none")
    assert bad.returncode != 0 and "cannot be compared" in bad.stderr


@pytest.mark.slow
def test_bench_probe_tiny(tmp_path):
    out = tmp_path / "p.csv"
    proc = run_script(
        "bench_probe.py",
        "--model",
        "tiny",
        "--rounds",
        "1",
        "--steps",
        "5",
        "--isolation",
        "inprocess",
        "--extra",
        "data.seq_len=32",
        "--csv",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = list(csv.DictReader(out.open()))
    assert int(row["rounds"]) == 1 and float(row["ratio"]) > 0 and "no interval" in row["verdict"]
    assert proc.stdout.count("probe=on ") == 2 and proc.stdout.count("probe=off") == 2
    proc = run_script(
        "bench_probe.py",
        "--model",
        "tiny",
        "--rounds",
        "6",
        "--steps",
        "2",
        "--extra",
        "data.seq_len=32",
        "--csv",
        str(out),
    )  # step-level pairing between two worker processes
    assert proc.returncode == 0, proc.stderr
    (row,) = list(csv.DictReader(out.open()))
    assert row["isolation"] == "workers" and int(row["rounds"]) == 6
    assert float(row["ci95_low"]) <= float(row["ratio"]) <= float(row["ci95_high"])


def test_framework_target_is_judged_on_the_interval():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench_overhead
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    assert bench_overhead.verdict(0.98, 1.015).startswith("met")
    assert bench_overhead.verdict(1.03, 1.2).startswith("missed")
    assert bench_overhead.verdict(0.95, 1.05).startswith(
        "undecided (interval"
    )  # a median of 1.00 is not enough
    assert bench_overhead.verdict(None, None).startswith("undecided (no interval")


def test_readme_gpu_table_is_the_committed_gpu_check_output():
    """The H200 table (docs/reproducing.md) quotes experiments/figures/gpu/gpu_check_h200.csv (what
    gpu_check.py
    wrote on the GPU)
    digit for digit: a GPU figure cannot be regenerated here, so it must at least be the one
    measured."""
    rows = list(csv.DictReader((ROOT / "experiments/figures/gpu/gpu_check_h200.csv").open()))
    from docs_text import page

    readme = page("reproducing")
    for r in rows:

        def num(key: str, fmt: str, r: dict = r) -> str:
            return "n/a" if r[key] == "" else format(float(r[key]), fmt)

        line = (
            f"| {r['strategy']} | {num('tokens_per_s', ',.0f')} | {num('mfu', '.3f')} | "
            f"{num('hfu', '.3f')} | "
            f"{num('recompute_overhead', '.3f')} | {num('peak_measured', ',.0f')} | "
            f"{num('peak_predicted', ',.0f')} | {num('act_measured', ',.0f')} | "
            f"{num('act_predicted', ',.0f')} |"
        )
        assert line in readme, line
        if r["strategy"] != "none":
            assert (
                r["time_words"].split(" (95% CI")[0] in readme
                and r["time_rounds"] + " rounds" in readme
            )


@pytest.mark.slow
def test_bench_cli_reduced(tmp_path):
    out = tmp_path / "bench_cli.md"
    proc = run_script(
        "bench_cli.py",
        *("--rounds", "1", "--entries", "estimate_405b", "--out", str(out)),
        *("--loop-rounds", "6", "--loop-iterations", "2"),
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ")]
    phases = [r[1] for r in rows if r[0] == "| estimate_405b"]
    assert phases == ["imports", "compose", "work", "total"]
    loops = [r for r in rows if r[0].startswith("| tiny b8 s64")]
    assert len(loops) == 4  # progress bar off, drawn, bare with ready batches, A/A
    for r in loops:
        low, high = map(float, r[4].split("-"))
        assert low <= float(r[3]) <= high and r[5] == "6 x 2"
        assert r[6].split()[0] in (("A/A:",) if "A/A" in r[0] else ("met", "missed", "undecided"))

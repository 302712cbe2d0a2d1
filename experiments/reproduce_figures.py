"""Regenerate every figure from scratch: run each figure's sweep (conf/experiment/fig*.yaml), then analyse them.

    python experiments/reproduce_figures.py --out experiments/figures

Runs on CPU in a few minutes (tiny models, fixed seeds: trainer.seed=0, data.seed=1234); the run folders go
to --runs (default outputs/reproduce_runs, git-ignored) and are deleted first, so nothing stale is mixed in.
--out receives summary.csv, summary.md, the five figures (PNG + PDF) and quiz.md. Rerunning gives the same
summary.csv except the timing columns (aggregate.TIMING_COLUMNS). Each job prints a line when it starts and when
it ends (status, seconds), read from the sweep's own output (Hydra's launcher lines and recompute_lab's log).

A sweep asks only for strategies this checkout has (conf/strategy/NAME.yaml); a figure whose runs cannot be
made yet is skipped with a note, and the figure and quiz.md then say which runs are missing.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recompute_lab.analyze import analyze  # noqa: E402

# (experiment config, extra overrides): one sweep per figure; figure 5 adds the 20 B/param case as one more run.
SWEEPS = [
    ("fig1_activation_vs_context", []),
    ("fig2_memory_breakdown", []),
    ("fig3_pareto", []),
    ("fig4_components", []),
    ("fig5_bytes_per_param", []),
    ("fig5_bytes_per_param", ["precision=bf16_master", "precision.fp32_grad_accum=true"]),
]


def available_strategies() -> set[str]:
    return {p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml")}


def sweep_strategies(experiment: str) -> list[str]:
    """The `+strategy` list of an experiment's hydra.sweeper.params (read from its YAML, no Hydra needed)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text())
    value = str(cfg["hydra"]["sweeper"]["params"]["+strategy"])
    return [s.strip() for s in value.split(",")]


def schema_has(key: str) -> bool:
    """Whether strategy selective has option ``key`` (its `modules` is what figure 4 sweeps)."""
    from recompute_lab.recompute import STRATEGIES, option_names

    return "selective" in STRATEGIES and key in option_names("selective")


def plan() -> list[tuple[str, str, list[str], str]]:
    """(experiment, sweep folder name, overrides, note) for every sweep this checkout can run."""
    have = available_strategies()
    out = []
    for i, (exp, extra) in enumerate(SWEEPS):
        wanted = sweep_strategies(exp)
        present = [s for s in wanted if s in have]
        note = ""
        if exp == "fig4_components" and not (present and schema_has("modules")):
            out.append((exp, "", [], "skipped: needs strategy=selective with strategy.modules"))
            continue
        if not present:
            out.append((exp, "", [], f"skipped: none of {wanted} exists in conf/strategy"))
            continue
        over = list(extra)
        if present != wanted:
            over.append("+strategy=" + ",".join(present))
            note = "without " + ",".join(s for s in wanted if s not in have) + " (not in conf/strategy)"
        if extra:
            over = [o for o in over if not o.startswith("+strategy=")] + ["+strategy=none"]
        out.append((exp, f"{i}_{exp}", over, note))
    return out


LAUNCH = re.compile(r"Launching (\d+) jobs")
JOB = re.compile(r"\t#(\d+) : (.*)")  # Hydra's basic launcher, one line per job as it starts
END = re.compile(r"\] run (ok|oom|diverged|interrupted|error)\b.*?: (\d+ min \d+ s|[\d.]+ s) \(results\.json")


def job_lines(lines, name: str):
    """The per-job progress lines of a sweep's output (Hydra's launch lines, recompute_lab.engine's run lines)."""
    total = "?"
    for line in lines:
        if m := LAUNCH.search(line):
            total = m[1]
        elif m := JOB.search(line):
            yield f"  {name}: job {int(m[1]) + 1}/{total} {m[2].strip()}"
        elif m := END.search(line):
            yield f"    {m[1]} in {m[2]}"


def run_sweep(exp: str, folder: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "recompute_lab.train", "-m", f"+experiment={exp}", f"hydra.sweep.dir={folder}",
           "hydra.callbacks.analyze.enabled=false", *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}  # unbuffered: job lines as they happen
    tail: collections.deque = collections.deque(maxlen=60)  # the end of the output, for a failure's message

    def read(stream):
        for line in stream:
            tail.append(line)
            yield line

    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for message in job_lines(read(proc.stdout), exp):
            print(message, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"sweep {exp} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{''.join(tail)[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "figures", help="figures, tables, quiz.md")
    p.add_argument("--runs", type=Path, default=ROOT / "outputs" / "reproduce_runs", help="run folders (wiped)")
    args = p.parse_args(argv)
    runs = args.runs.resolve()
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    t0 = time.perf_counter()
    for exp, name, overrides, note in plan():
        if not name:
            print(f"{exp}: {note}", flush=True)
            continue
        t = time.perf_counter()
        run_sweep(exp, runs / name, overrides)
        print(f"{exp} {' '.join(overrides)}: {time.perf_counter() - t:.0f} s {note}".rstrip(), flush=True)
    source = os.path.relpath(runs, ROOT) if runs.is_relative_to(ROOT) else str(runs)
    res = analyze(runs, args.out, label=source)
    bad = [r for r in res["rows"] if r["status"] != "ok"]
    print(f"analysed {len(res['rows'])} runs ({len(bad)} not ok) from {source} -> {args.out}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

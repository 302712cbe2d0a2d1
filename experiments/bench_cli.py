"""Benchmark: where a researcher waits (issue 29). Each entry point's phases (imports, compose,
work) and the training loop's iteration against a bare nanoGPT-style loop, side by side in one run.

To run:  python experiments/bench_cli.py [--rounds 6] [--loop-rounds 20] [--loop-iterations 20]
                                         [--entries estimate_405b,...] [--out FILE]

Entry points run in fresh child processes (this script with ``--child NAME``: imports timed from
the child's first line, then Hydra's compose, then the work), in rounds whose order rotates so the
drift of a shared machine reaches every entry; ``total`` is the child's wall time seen from here,
interpreter start-up included. ``estimate_405b_cli`` is the real command a researcher types
(``python -m recompute_lab.estimate ...``), timed whole; ``plan_8b_cli`` the advisor's question
(``python -m recompute_lab.plan model=llama3_8b data.seq_len=8192 plan.gpus=8 plan.gpu=h100_80gb``).

The loop: in this process, the framework's training loop (recompute_lab.run.engine.loop, chunks of
``--loop-iterations`` iterations: data, the step, loss sync, logging) against a bare loop on the
same model (nanoGPT's get_batch: random windows of a token stream; the hand-written step of
experiments/bench_overhead.py), in ABBA rounds (experiments/common.fixed_rounds): the
per-iteration ratio is the median over rounds of the chunks' time ratio, with its 95% interval.
The first-step model-state record, once per run, is left out of the chunks after the first.

Every figure is a median over rounds with a distribution-free 95% interval
(recompute_lab.measure.timing.median_ci; fewer than 6 rounds: no interval) and the 1-minute load
average sampled before each of its rounds (median, range): on the 2 shared cores the load moves
every figure. Writes a markdown table to --out (default experiments/figures/bench_cli.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "figures" / "bench_cli.md"
ESTIMATE_405B = [
    "model=llama3_405b",
    "data.seq_len=8192",
    "data.batch_size=1",
    "precision=bf16_master",
    "+strategy=full",
]
TRAIN_TINY = [
    "model=tiny",
    "trainer.steps=20",
    "logger=none",
    "trainer.progress=false",
]
# what estimate() imports when the theory answers (a module-level strategy on one device): no torch
ESTIMATE_IMPORTS = (
    "recompute_lab.predict.per_gpu",
    "recompute_lab.predict.prediction",
    "recompute_lab.predict.module_plans",
    "recompute_lab.predict.theory",
    "recompute_lab.predict.layout",
    "recompute_lab.predict.devices",
)
ENTRIES = ("estimate_405b", "estimate_405b_cli", "plan_8b_cli", "what_fits", "train_tiny")
PLAN_8B = ["model=llama3_8b", "data.seq_len=8192", "plan.gpus=8", "plan.gpu=h100_80gb"]
CLI_ENTRIES = {  # timed whole, as typed
    "estimate_405b_cli": ["-m", "recompute_lab.estimate", *ESTIMATE_405B],
    "plan_8b_cli": ["-m", "recompute_lab.plan", *PLAN_8B],
}
LOOP_TARGET = 1.02


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from recompute_lab.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def child(name: str) -> dict:
    """One entry point's phases, in this fresh process (seconds); ``answer``: its headline
    figure."""
    t0 = time.perf_counter()
    if name == "estimate_405b":
        import importlib

        from recompute_lab.cli.estimate import estimate

        for module in ESTIMATE_IMPORTS:  # what estimate() imports when it starts
            importlib.import_module(module)

        t1 = time.perf_counter()
        cfg = compose("estimate", ESTIMATE_405B)
        t2 = time.perf_counter()
        res = estimate(cfg, cfg.estimate)
        answer = res["memory"]["peak_bytes"]["predicted"]
    elif name == "what_fits":
        sys.path.insert(0, str(HERE))
        import what_fits

        t1 = t2 = time.perf_counter()  # no Hydra: the script reads conf/model/*.yaml itself
        answer = len(what_fits.markdown(what_fits.grid()))
    elif name == "train_tiny":
        from recompute_lab.run.engine import run

        t1 = time.perf_counter()
        cfg = compose("config", TRAIN_TINY)
        t2 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            res = run(cfg, Path(d))
        answer = res["status"]
    else:
        raise SystemExit(f"unknown child {name!r}; valid: estimate_405b, what_fits, train_tiny")
    t3 = time.perf_counter()
    return {"imports": t1 - t0, "compose": t2 - t1, "work": t3 - t2, "answer": answer}


def run_entry(name: str) -> dict:
    """One round of one entry: its phases (a child process) and its wall time seen from here."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    with tempfile.TemporaryDirectory() as d:
        if name in CLI_ENTRIES:
            args = [*CLI_ENTRIES[name], f"hydra.run.dir={d}"]
        else:
            args = [str(Path(__file__).resolve()), "--child", name]
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, *args], cwd=d, env=env, capture_output=True, text=True
        )
        total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    phases = {} if name in CLI_ENTRIES else json.loads(proc.stdout.strip().splitlines()[-1])
    return {**phases, "total": total}


def figure(values: list[float], loads: list[float]) -> dict:
    from recompute_lab.measure.timing import median_ci

    med, lo, hi = median_ci(values)
    return {
        "median": med,
        "low": lo,
        "high": hi,
        "n": len(values),
        "load": statistics.median(loads),
        "load_min": min(loads),
        "load_max": max(loads),
    }


def entry_rounds(names: list[str], rounds: int) -> dict:
    """Every entry ``rounds`` times, the order rotated each round; phase figures per entry."""
    samples: dict = {n: {"loads": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            load = os.getloadavg()[0]
            res = run_entry(name)
            samples[name]["loads"].append(load)
            for phase, v in res.items():
                if phase != "answer":
                    samples[name].setdefault(phase, []).append(v)
                else:
                    samples[name]["answer"] = v
            print(f"  round {r + 1}/{rounds} {name}: {res['total']:.2f} s (load {load:.2f})")
    return {
        name: {
            "answer": s.get("answer"),
            **{
                phase: figure(v, s["loads"])
                for phase, v in s.items()
                if phase not in ("loads", "answer")
            },
        }
        for name, s in samples.items()
    }


def loop_pairing(model: str, progress: bool, rounds: int, iterations: int) -> dict:
    """The framework's loop against a bare nanoGPT-style loop, per iteration, paired in one
    process."""
    import torch

    import bench_overhead
    from common import fixed_rounds
    from recompute_lab.config.spec import RunSpec
    from recompute_lab.model.data import Batches
    from recompute_lab.record.results import new_results
    from recompute_lab.record.wandb_run import RunLogger
    from recompute_lab.run import engine
    from recompute_lab.run.distributed import DistContext
    from recompute_lab.run.failures import SignalFlag

    steps = (rounds + 2) * iterations * 2
    cfg = compose(
        "config",
        [
            f"model={model}",
            f"trainer.steps={steps}",
            "logger=none",
            f"trainer.progress={str(progress).lower()}",
            "trainer.overhead.enabled=false",
        ],
    )
    spec = RunSpec.of(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cli_loop_"))
    results = new_results(spec.to_dict())
    fw = engine.build(spec, results, tmp, DistContext())
    job = engine.Job(results, RunLogger(spec, tmp), tmp, {"step": None}, SignalFlag())
    record_once = engine.record_model_state
    state = {"next": 0, "parts": []}

    def framework(i: int) -> float:
        start = state["next"]
        chunk = spec.replace(trainer__steps=start + iterations)
        t0 = time.perf_counter()
        engine.loop(chunk, fw, start, job)
        dt = time.perf_counter() - t0
        state["next"] = start + iterations
        state["parts"].append(dict(results["time"]["loop"]))
        engine.record_model_state = lambda run, res: None  # a run records it once
        return dt

    step = bench_overhead.bare_setup(cfg)
    data = Batches(spec.data, spec.model.vocab_size)
    stream = torch.cat([data.get(k)[0].flatten() for k in range(64)])  # nanoGPT's train.bin
    block, batch = spec.data.seq_len, spec.data.batch_size

    def get_batch():  # nanoGPT train.py's get_batch
        ix = torch.randint(len(stream) - block, (batch,))
        x = torch.stack([stream[i : i + block] for i in ix])
        y = torch.stack([stream[i + 1 : i + 1 + block] for i in ix])
        return x, y

    def bare(i: int) -> float:
        t0 = time.perf_counter()
        for _ in range(iterations):
            step(*get_batch())
        return time.perf_counter() - t0

    loads = []

    def sampled(arm):
        def timed(i: int) -> float:
            loads.append(os.getloadavg()[0])
            return arm(i)

        return timed

    try:
        res = fixed_rounds(sampled(framework), sampled(bare), rounds)
    finally:
        engine.record_model_state = record_once
    parts = state["parts"][1:]  # the warmup chunk left out
    per_iter = {
        k: statistics.median(p[k] / p["iterations"] for p in parts) * 1e3
        for k in ("step_s", "data_s", "log_s", "other_s")
    }
    return {
        "config": f"{model} b{spec.data.batch_size} s{spec.data.seq_len}, progress bar "
        f"{'on' if progress else 'off'}, logger none",
        "framework_ms": res.a_step_s / iterations * 1e3,
        "bare_ms": res.b_step_s / iterations * 1e3,
        "ratio": res.ratio,
        "low": res.ci95_low,
        "high": res.ci95_high,
        "rounds": res.rounds,
        "load": statistics.median(loads),
        "load_min": min(loads),
        "load_max": max(loads),
        "per_iteration_ms": per_iter,
    }


def verdict(low, high) -> str:
    if low is None:
        return "undecided (no interval)"
    if high <= LOOP_TARGET:
        return f"met (upper bound {high:.3f} <= {LOOP_TARGET})"
    if low > LOOP_TARGET:
        return f"missed (lower bound {low:.3f} > {LOOP_TARGET})"
    return f"undecided ({low:.3f}-{high:.3f} spans {LOOP_TARGET})"


def interval(f: dict, fmt: str) -> str:
    if f["low"] is None:
        return "n/a"
    return f"{format(f['low'], fmt)}-{format(f['high'], fmt)}"


def load_cell(f: dict) -> str:
    return f"{f['load']:.2f} ({f['load_min']:.2f}-{f['load_max']:.2f})"


def markdown(entries: dict, loops: list[dict], header: str) -> str:
    lines = [
        "# Where a researcher waits (experiments/bench_cli.py)",
        "",
        header,
        "",
        "## Entry points: seconds per phase",
        "",
        "Median over rounds, 95% interval of the median, 1-minute load average before each round "
        "(median, range). Targets (issue 29): estimate, plan and what_fits under 2 s wall on a "
        "quiet machine.",
        "",
        "| entry | phase | median s | 95% CI | rounds | load |",
        "|---|---|---|---|---|---|",
    ]
    for name, phases in entries.items():
        for phase in ("imports", "compose", "work", "total"):
            f = phases.get(phase)
            if f is None:
                continue
            lines.append(
                f"| {name} | {phase} | {f['median']:.2f} | {interval(f, '.2f')} | {f['n']} "
                f"| {load_cell(f)} |"
            )
    lines += [
        "",
        "## Training loop: one iteration, framework / bare nanoGPT-style loop",
        "",
        "Paired ABBA rounds in one process; ratio = median over rounds of the chunks' time "
        f"ratio, 95% interval; target <= {LOOP_TARGET} (upper bound). The framework's iteration "
        "split (ms, median over chunks): step, data, logging (progress bar, step lines), other "
        "(loss sync, checks, the loop record).",
        "",
        "| loop | framework ms | bare ms | ratio | 95% CI | rounds | target | step / data / "
        "log / other ms | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in loops:
        p = r["per_iteration_ms"]
        lines.append(
            f"| {r['config']} | {r['framework_ms']:.2f} | {r['bare_ms']:.2f} | {r['ratio']:.3f} "
            f"| {interval(r, '.3f')} | {r['rounds']} | {verdict(r['low'], r['high'])} "
            f"| {p['step_s']:.2f} / {p['data_s']:.3f} / {p['log_s']:.3f} / {p['other_s']:.3f} "
            f"| {load_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per entry point (>= 6: CI)")
    ap.add_argument("--entries", default=",".join(ENTRIES))
    ap.add_argument("--loop-rounds", type=int, default=20, help="0: skip the loop")
    ap.add_argument("--loop-iterations", type=int, default=20, help="iterations per chunk")
    ap.add_argument("--loop-model", default="tiny")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return ""
    names = [n for n in args.entries.split(",") if n]
    unknown = sorted(set(names) - set(ENTRIES))
    if unknown:
        sys.exit(f"unknown entries {unknown}; valid: {', '.join(ENTRIES)}")
    sys.path.insert(0, str(HERE))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"entry points: {len(names)} x {args.rounds} rounds, each in a fresh process")
    entries = entry_rounds(names, args.rounds)
    loops = []
    for progress in (False, True) if args.loop_rounds > 0 else ():  # 0: entry points only
        print(f"training loop: {args.loop_rounds} paired rounds, progress bar {progress}")
        rounds, its = args.loop_rounds, args.loop_iterations
        loops.append(loop_pairing(args.loop_model, progress, rounds, its))
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    header = (
        f"{started}, commit {commit or 'n/a'}; torch {torch.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs (shared), training with "
        f"{torch.get_num_threads()} thread(s). Command: `python experiments/bench_cli.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`."
    )
    text = markdown(entries, loops, header)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()

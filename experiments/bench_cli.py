"""Benchmark: where a researcher waits (issue 29). Each entry point's phases (imports, compose,
work) and the training loop's iteration against a bare nanoGPT-style loop, side by side in one run.

To run:  python experiments/bench_cli.py [--rounds 6] [--loop-rounds 200] [--loop-iterations 2]
                                         [--entries estimate_405b,...] [--out FILE]
                                         [--loops bar_off,bar_drawn,ready,aa]
The loop only: --rounds 0 --entries ''.

Entry points run in fresh child processes (this script with ``--child NAME``: imports timed from
the child's first line, then Hydra's compose, then the work), in rounds whose order rotates so the
drift of a shared machine reaches every entry; ``total`` is the child's wall time seen from here,
interpreter start-up included. ``estimate_405b_cli`` is the real command a researcher types
(``python -m recompute_lab.estimate ...``), timed whole; ``plan_8b_cli`` the advisor's question
(``python -m recompute_lab.plan model=llama3_8b data.seq_len=8192 plan.gpus=8 plan.gpu=h100_80gb``).

The loop: in this process, arm A against arm B per iteration, in ABBA rounds
(experiments/common.fixed_rounds) of chunks of ``--loop-iterations`` iterations per arm; the
ratio is the median over rounds of the round's time ratio with its distribution-free 95%
interval (recompute_lab.measure.timing). Rows (``--loops``): the framework's training loop
(recompute_lab.run.engine.loop: data, the step, loss sync, logging) with the progress bar off,
then drawn (stderr a terminal that shows nothing: tqdm formats and writes as on a console), each
against a bare loop on the same model (nanoGPT's get_batch: random windows of a token stream; the
hand-written step of experiments/bench_overhead.py); the framework against a bare loop whose
batches were made beforehand (no data cost at all: the strictest baseline); and A/A, two
identical bare loops (the noise floor: its interval should cover 1). A framework chunk is timed
from its first iteration's data request to loop()'s return: every iteration whole, bar.close()
included, loop()'s once-per-run entry (model.train(), the bar's construction, ~0.2 ms) not. The
first-step model-state record, once per run, is left out of the chunks after the first.

Why short chunks (defaults 200 rounds x 2 iterations, ~25 s a row, ~100 s for four): on the
shared cores a tiny step's time drifts slowly (autocorrelation of consecutive steps 0.76, 0.31
twenty steps apart, chunk-to-chunk spread 12% at 20 iterations), so arms interleaved finely see
the same drift and it cancels in the round's ratio. Measured A/A intervals for the same ~1,600
iterations per arm: 20 rounds x 20 iterations 0.944-1.032, 80 x 5 0.983-1.024, 200 x 2
0.990-1.003; the estimator is unchanged (median of round ratios, sign-test interval: exact, no
symmetry or normality assumed), the design is what narrows it.

Every figure is a median over rounds with a distribution-free 95% interval
(recompute_lab.measure.timing.median_ci; fewer than 6 rounds: no interval) and the 1-minute load
average sampled before each of its rounds (median, range): on the 2 shared cores the load moves
every figure. Writes a markdown table to --out (default experiments/figures/bench_cli.md).
"""

from __future__ import annotations

import argparse
import io
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
# loop rows: name -> (what A / B are, the framework's progress bar drawn, the bare loop's data)
LOOPS = {
    "bar_off": ("framework, progress bar off / bare, nanoGPT get_batch", False, "nanogpt"),
    "bar_drawn": ("framework, progress bar drawn / bare, nanoGPT get_batch", True, "nanogpt"),
    "ready": ("framework, progress bar off / bare, batches made beforehand", False, "ready"),
    "aa": ("A/A: bare / bare, nanoGPT get_batch", False, "nanogpt"),
}


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


class Terminal(io.TextIOWrapper):
    """stderr as a terminal that shows nothing: the loop draws its progress bar (it asks isatty)
    and tqdm formats and writes it as on a console, to /dev/null (a console's own drawing is
    another process's time)."""

    def isatty(self) -> bool:
        return True


def loop_pairing(model: str, row: str, rounds: int, iterations: int) -> dict:
    """One LOOPS row: arm A against arm B per iteration, paired ABBA rounds in one process."""
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

    label, bar, bare_data = LOOPS[row]
    steps = (rounds + 2) * iterations * 2
    cfg = compose(
        "config",
        [
            f"model={model}",
            f"trainer.steps={steps}",
            "logger=none",
            f"trainer.progress={str(bar).lower()}",
            "trainer.overhead.enabled=false",
        ],
    )
    spec = RunSpec.of(cfg)
    data = Batches(spec.data, spec.model.vocab_size)
    stream = torch.cat([data.get(k)[0].flatten() for k in range(64)])  # nanoGPT's train.bin
    block, batch = spec.data.seq_len, spec.data.batch_size

    def get_batch():  # nanoGPT train.py's get_batch
        ix = torch.randint(len(stream) - block, (batch,))
        x = torch.stack([stream[i : i + block] for i in ix])
        y = torch.stack([stream[i + 1 : i + 1 + block] for i in ix])
        return x, y

    ready = [data.get(k) for k in range(64)]  # the framework's own batches, made beforehand
    made = {"n": 0}

    def ready_batch():
        made["n"] += 1
        return ready[made["n"] % len(ready)]

    def bare_arm():
        step = bench_overhead.bare_setup(cfg)
        next_batch = get_batch if bare_data == "nanogpt" else ready_batch

        def bare(i: int) -> float:
            t0 = time.perf_counter()
            for _ in range(iterations):
                step(*next_batch())
            return time.perf_counter() - t0

        return bare

    state = {"next": 0, "parts": []}
    record_once = engine.record_model_state
    if row == "aa":  # the noise floor: two identical bare loops
        arm_a = bare_arm()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_cli_loop_"))
        results = new_results(spec.to_dict())
        fw = engine.build(spec, results, tmp, DistContext())
        job = engine.Job(results, RunLogger(spec, tmp), tmp, {"step": None}, SignalFlag())
        first_get: list[float] = []

        class Marked:
            """The run's batches, noting when a chunk's first iteration asks for its data: the
            chunk is timed from there (after engine.loop's once-per-run entry: model.train(),
            the bar's construction) to loop()'s return (bar.close() included)."""

            def __init__(self, batches):
                self.batches = batches

            def get(self, step: int, micro: int = 0):
                if not first_get:
                    first_get.append(time.perf_counter())
                return self.batches.get(step, micro)

        fw.batches = Marked(fw.batches)
        terminal = Terminal(open(os.devnull, "wb"), write_through=True) if bar else None

        def arm_a(i: int) -> float:
            start = state["next"]
            chunk = spec.replace(trainer__steps=start + iterations)
            first_get.clear()
            saved, sys.stderr = sys.stderr, terminal or sys.stderr
            try:
                engine.loop(chunk, fw, start, job)
                end = time.perf_counter()
            finally:
                sys.stderr = saved
            state["next"] = start + iterations
            state["parts"].append(dict(results["time"]["loop"]))
            engine.record_model_state = lambda run, res: None  # a run records it once
            return end - first_get[0]

    arm_b = bare_arm()
    loads = []

    def sampled(arm):
        def timed(i: int) -> float:
            loads.append(os.getloadavg()[0])
            return arm(i)

        return timed

    try:
        res = fixed_rounds(sampled(arm_a), sampled(arm_b), rounds)
    finally:
        engine.record_model_state = record_once
    parts = state["parts"][1:]  # the warmup chunk left out
    per_iter = (
        {
            k: statistics.median(p[k] / p["iterations"] for p in parts) * 1e3
            for k in ("step_s", "data_s", "log_s", "other_s")
        }
        if parts
        else None
    )
    return {
        "config": f"{model} b{spec.data.batch_size} s{spec.data.seq_len}, {label}",
        "row": row,
        "a_ms": res.a_step_s / iterations * 1e3,
        "b_ms": res.b_step_s / iterations * 1e3,
        "ratio": res.ratio,
        "low": res.ci95_low,
        "high": res.ci95_high,
        "rounds": res.rounds,
        "iterations": iterations,
        "seconds": res.seconds,
        "load": statistics.median(loads),
        "load_min": min(loads),
        "load_max": max(loads),
        "per_iteration_ms": per_iter,
    }


def verdict(r: dict) -> str:
    low, high = r["low"], r["high"]
    if low is None:
        return "undecided (no interval)"
    if r["row"] == "aa":  # identical arms: an interval without 1 would be a false difference
        return "A/A: covers 1" if low <= 1.0 <= high else "A/A: excludes 1 (false difference)"
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
        "## Training loop: one iteration, framework / bare loop",
        "",
        "Arm A / arm B per iteration, paired ABBA rounds in one process, chunks of a few "
        "iterations per arm; ratio = median over rounds of the round's time ratio, 95% "
        f"distribution-free (sign-test) interval; target <= {LOOP_TARGET} (upper bound). The "
        "A/A row times two identical bare loops: the noise floor, its interval should cover 1. "
        "The framework's iteration split (ms, median over chunks): step, data, logging "
        "(progress bar, step lines), other (loss sync, checks). Seconds: the rounds' wall time.",
        "",
        "| loop (A / B) | A ms | B ms | ratio | 95% CI | rounds x iterations | target "
        "| step / data / log / other ms | load | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in loops:
        p = r["per_iteration_ms"]
        split = (
            "n/a"
            if p is None
            else f"{p['step_s']:.2f} / {p['data_s']:.3f} / {p['log_s']:.3f} / {p['other_s']:.3f}"
        )
        lines.append(
            f"| {r['config']} | {r['a_ms']:.2f} | {r['b_ms']:.2f} | {r['ratio']:.3f} "
            f"| {interval(r, '.3f')} | {r['rounds']} x {r['iterations']} | {verdict(r)} "
            f"| {split} | {load_cell(r)} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per entry point (>= 6: CI)")
    ap.add_argument("--entries", default=",".join(ENTRIES))
    ap.add_argument("--loop-rounds", type=int, default=200, help="0: skip the loop")
    ap.add_argument("--loop-iterations", type=int, default=2, help="iterations per chunk")
    ap.add_argument("--loops", default=",".join(LOOPS), help="loop rows: " + ", ".join(LOOPS))
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
    rows = [r for r in args.loops.split(",") if r] if args.loop_rounds > 0 else []  # 0: none
    unknown = sorted(set(rows) - set(LOOPS))
    if unknown:
        sys.exit(f"unknown loops {unknown}; valid: {', '.join(LOOPS)}")
    loops = []
    for row in rows:
        rounds, its = args.loop_rounds, args.loop_iterations
        print(f"training loop: {rounds} paired rounds x {its} iterations, {LOOPS[row][0]}")
        loops.append(loop_pairing(args.loop_model, row, rounds, its))
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

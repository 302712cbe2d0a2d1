"""Benchmark: does the memory probe slow down the training steps that follow it? Probe on vs off,
paired.

To run:  python experiments/bench_probe.py [--model small] [--rounds 30] [--isolation workers]
                                           [--extra data.seq_len=256 data.batch_size=2] [--csv
                                           out.csv]

Arm A trains with `trainer.probe=true`, arm B with `trainer.probe=false`; everything else is equal
(the in-run
overhead measurement is off). The arms alternate in ABBA / BAAB rounds
(recompute_lab.measure.timing.run_paired); per
round the ratio is (A1 + A2) / (B1 + B2); the table gives the median ratio and its 95% interval.

--isolation workers (default, step-level pairing): two worker processes, started alike; each builds
the run with
engine.build (A's build runs the probe, B's does not), trains --steps warm-up steps, then runs one
training step
(engine.train_step) whenever the parent asks and reports its time. The parent asks A and B in ABBA
order, so the
paired steps are milliseconds apart and share the machine's load; the probe's process-wide
leftovers, if any,
live in A's process only.
--isolation subprocess: each estimator step is one whole `python -m recompute_lab.train` run in a
fresh process,
valued by its median step time (pairs are whole runs, tens of seconds apart: much noisier on a
shared machine).
--isolation inprocess: each is engine.run() in this one process, one after another (as
bench_overhead did when
the README's "probe slows training ~15%" claim was made): one run's probe can then also reach later
runs of
either arm.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose_cfg, fixed_rounds, print_table, run_overrides, write_csv  # noqa: E402

from recompute_lab.measure.timing import describe, run_paired  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def median_step_s(overrides: list[str], isolation: str) -> float:
    """One training run's median step time after warmup (a fresh process, or engine.run in this
    one)."""
    if isolation == "inprocess":
        res = run_overrides(overrides)
    else:
        with tempfile.TemporaryDirectory() as d:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "recompute_lab.train",
                    *overrides,
                    "logger=none",
                    "trainer.progress=false",
                    f"hydra.run.dir={d}",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                sys.exit(f"run failed ({' '.join(overrides)}):\n{proc.stderr[-2000:]}")
            res = json.loads((Path(d) / "results.json").read_text())
    if res["status"] != "ok" or res["time"]["step_s_median"] is None:
        sys.exit(
            f"run {' '.join(overrides)}: status {res['status']}, "
            f"{res.get('error') or res['time'].get('reason')}"
        )
    return res["time"]["step_s_median"]


def worker(conn, overrides: list[str], warm_steps: int) -> None:
    """A training run held open: build it (probe as configured), warm it up, then one step per
    request."""
    from recompute_lab.run.distributed import DistContext
    from recompute_lab.run.engine import build, train_step
    from recompute_lab.measure.memory import StepTimer
    from recompute_lab.config.spec import RunSpec
    from recompute_lab.record.results import new_results

    cfg = RunSpec.of(compose_cfg([*overrides, "logger=none", "trainer.progress=false"]))
    with tempfile.TemporaryDirectory() as d:
        run = build(cfg, new_results(cfg.to_dict()), Path(d), DistContext())
        progress: dict = {}

        def step(i: int) -> float:
            micro = [
                tuple(x.to(run.device) for x in run.batches.get(i, m))
                for m in range(cfg.trainer.grad_accum)
            ]
            with StepTimer(run.device) as timer:
                train_step(cfg, run, micro, progress)
            return timer.seconds

        for i in range(warm_steps):
            step(i)
        conn.send("ready")
        while (i := conn.recv()) is not None:
            conn.send(step(warm_steps + i))


def paired_workers(base: list[str], rounds: int, warm_steps: int, log: list[dict]):
    """Step-level ABBA rounds between a worker that ran the probe and one that did not."""
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for probe in (True, False):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=worker, args=(child, [*base, f"trainer.probe={str(probe).lower()}"], warm_steps)
        )
        proc.start()
        pipes[probe] = parent
        procs.append(proc)
    try:
        for probe, conn in pipes.items():
            if conn.recv() != "ready":
                sys.exit(f"worker (probe={probe}) did not start")

        def arm(probe: bool):
            def one_step(i: int) -> float:
                pipes[probe].send(i + 1)  # round i's batch (warm-up rounds use negative i)
                s = pipes[probe].recv()
                log.append({"round": i, "probe": probe, "step_s": s})
                return s

            return one_step

        return fixed_rounds(arm(True), arm(False), rounds)
    finally:
        for conn in pipes.values():
            conn.send(None)
        for proc in procs:
            proc.join(timeout=60)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--rounds", type=int, default=30, help="ABBA rounds (>= 6 for a 95%% interval)")
    ap.add_argument(
        "--steps", type=int, default=12, help="training steps per run (workers: warm-up steps)"
    )
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument(
        "--isolation", choices=("workers", "subprocess", "inprocess"), default="workers"
    )
    ap.add_argument(
        "--extra",
        nargs="*",
        default=["data.seq_len=256", "data.batch_size=2"],
        help="more Hydra overrides for both arms",
    )
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    base = [
        f"model={args.model}",
        f"trainer.steps={args.steps}",
        f"trainer.warmup_steps={args.warmup_steps}",
        "trainer.overhead.enabled=false",
        *args.extra,
    ]
    log: list[dict] = []

    def arm(probe: bool):
        def one_run(i: int) -> float:
            s = median_step_s([*base, f"trainer.probe={str(probe).lower()}"], args.isolation)
            log.append({"round": i, "probe": probe, "step_s_median": s})
            print(
                f"  round {i:>2} probe={'on ' if probe else 'off'} median step {s * 1e3:8.1f} ms",
                flush=True,
            )
            return s

        return one_run

    print(
        f"probe on vs off: model={args.model} {' '.join(args.extra)}, {args.steps} steps "
        f"({args.warmup_steps} warmup), {args.rounds} ABBA rounds, isolation={args.isolation}"
    )
    if args.isolation == "workers":
        res = paired_workers(base, args.rounds, args.steps, log)
    else:
        res = run_paired(
            arm(True),
            arm(False),
            min_rounds=args.rounds,
            max_rounds=args.rounds,
            target_rel_width=0.0,
            warmup_rounds=0,
        )
    row = {
        "model": args.model,
        "extra": " ".join(args.extra),
        "isolation": args.isolation,
        "rounds": res.rounds,
        "probe_on_ms": res.a_step_s * 1e3,
        "probe_off_ms": res.b_step_s * 1e3,
        "ratio": res.ratio,
        "ci95_low": res.ci95_low,
        "ci95_high": res.ci95_high,
        "verdict": describe(res.ratio, res.ci95_low, res.ci95_high),
    }
    print_table(
        [row],
        [
            ("isolation", "isolation", "s"),
            ("rounds", "rounds", "d"),
            ("probe_on_ms", "on ms", ".1f"),
            ("probe_off_ms", "off ms", ".1f"),
            ("ratio", "on/off", ".3f"),
            ("ci95_low", "ci low", ".3f"),
            ("ci95_high", "ci high", ".3f"),
            ("verdict", "probe on vs off", "s"),
        ],
    )
    print("round ratios:", ", ".join(f"{r:.3f}" for r in res.ratios))
    write_csv([row], args.csv)
    return row


if __name__ == "__main__":
    main()

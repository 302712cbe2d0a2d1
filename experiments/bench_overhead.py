"""Benchmark: recompute_lab's training step vs a bare hand-written PyTorch loop (target ratio <=
1.02).

To run:  python experiments/bench_overhead.py [--model tiny] [--strategies none,full] [--pairing
         steps]
                                              [--rounds 30] [--steps 30]

Both arms train the same model (recompute_lab.model.gpt, the same strategy applied), on the same
batches, with the
same threads, AdamW settings, LR schedule and gradient clipping; arm B is a plain loop written here.
The arms
alternate in ABBA / BAAB rounds (recompute_lab.measure.timing.run_paired), so drift of a noisy
machine hits both; the
table gives the median of the per-round ratios with its 95% interval. The target is met when the
interval's
upper bound is <= 1.02, missed when its lower bound is above, and otherwise not decided by this many
rounds.

--pairing steps (default): one process holds both: the framework's run as engine.build sets it up
(precision
policy, strategy, optimizer, scheduler; the memory probe as configured) stepped by
engine.train_step, and the bare
model stepped by the hand-written step. Paired steps are milliseconds apart, so the interval is
narrow; what the
training loop adds around each step (timer, W&B / progress-bar logging, history) is outside it.
--pairing runs: arm A is a whole engine.run() (everything, its in-run overhead measurement off), arm
B a whole
bare loop; each valued by its median step time after warmup. Pairs are seconds apart: on a loaded
machine the
interval is wide. Writes a CSV with --csv.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from recompute_lab.model.data import Batches
from recompute_lab.run.distributed import DistContext
from recompute_lab.run.engine import build, lr_lambda, run, train_step
from recompute_lab.measure.memory import StepTimer
from recompute_lab.model.gpt import build_model
from recompute_lab.strategies import STRATEGIES, apply_strategy
from recompute_lab.measure.timing import MIN_ROUNDS_FOR_CI, run_paired
from recompute_lab.record.results import new_results
from recompute_lab.config.spec import RunSpec

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def framework_step_s(cfg) -> float:
    with tempfile.TemporaryDirectory() as d:
        res = run(cfg, Path(d))
    assert res["status"] == "ok", res.get("error")
    return res["time"]["step_s_median"]


def bare_setup(cfg):
    """The hand-written training step, what a researcher would write without the framework:
    step(idx, targets)
    returns its wall time."""
    if cfg.trainer.num_threads:  # the framework's fixed thread count, whichever arm runs first
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model)
    apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape())
    o = cfg.optimizer
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, cfg.trainer.steps))
    model.train()

    def step(idx, targets) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        loss.item()
        return time.perf_counter() - t0

    return step


def bare_step_s(cfg) -> float:
    """A whole bare run: its median step time after warmup."""
    step = bare_setup(cfg)
    data = Batches(cfg.data, cfg.model.vocab_size)
    batches = [data.get(i) for i in range(cfg.trainer.steps)]
    times = [step(idx, targets) for idx, targets in batches]
    return statistics.median(times[cfg.trainer.warmup_steps :])


def paired_steps(cfg, rounds: int):
    """Step-level pairing in one process: engine.train_step on the framework's run vs the bare
    step."""
    spec = RunSpec.of(cfg)
    with tempfile.TemporaryDirectory() as d:
        fw = build(spec, new_results(spec.to_dict()), Path(d), DistContext())
    bare = bare_setup(cfg)
    data = Batches(cfg.data, cfg.model.vocab_size)

    def framework(i: int) -> float:
        micro = [tuple(x.to(fw.device) for x in data.get(1000 + i))]
        with StepTimer(fw.device) as timer:
            fw.dctx.reduce_step(train_step(spec, fw, micro, {}), False)  # the loop's loss.item()
        return timer.seconds

    def hand_written(i: int) -> float:
        return bare(*data.get(1000 + i))

    return run_paired(
        framework,
        hand_written,
        min_rounds=rounds,
        max_rounds=rounds,
        target_rel_width=0.0,
        warmup_rounds=2,
    )


TARGET = 1.02


def verdict(lo, hi) -> str:
    """The <= 1.02x target judged on the interval: met only when its upper bound is within it."""
    if lo is None:
        return f"undecided (no interval: fewer than {MIN_ROUNDS_FOR_CI} rounds)"
    if hi <= TARGET:
        return f"met (upper bound {hi:.3f} <= {TARGET})"
    if lo > TARGET:
        return f"missed (lower bound {lo:.3f} > {TARGET})"
    return f"undecided (interval {lo:.3f}-{hi:.3f} spans {TARGET})"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--strategies", default="none,full")
    ap.add_argument("--pairing", choices=("steps", "runs"), default="steps")
    ap.add_argument("--rounds", type=int, default=30, help="ABBA rounds (>= 6 for a 95%% interval)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--extra", nargs="*", default=[], help="more Hydra overrides, e.g. data.seq_len=128"
    )
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    names = args.strategies.split(",")
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        sys.exit(f"unknown strategies {unknown}; valid: {', '.join(sorted(STRATEGIES))}")
    rows = []
    print(
        f"torch {torch.__version__}, model={args.model}, {args.rounds} ABBA rounds of "
        + (
            "paired steps in one process"
            if args.pairing == "steps"
            else f"whole runs ({args.steps} steps each)"
        )
        + " per strategy"
    )
    print(
        f"{'strategy':<12}{'framework ms':>14}{'bare ms':>10}{'ratio':>8}  95% CI         target "
        f"<= {TARGET}"
    )
    for name in names:
        cfg = compose_cfg(
            [
                f"model={args.model}",
                f"+strategy={name}",
                f"trainer.steps={args.steps}",
                "logger=none",
                "trainer.progress=false",
                "trainer.overhead.enabled=false",
                *args.extra,
            ]
        )
        if args.pairing == "steps":
            res = paired_steps(cfg, args.rounds)
        else:
            res = run_paired(
                lambda i, c=cfg: framework_step_s(c),
                lambda i, c=cfg: bare_step_s(c),
                min_rounds=args.rounds,
                max_rounds=args.rounds,
                target_rel_width=0.0,
                warmup_rounds=0,
            )
        row = {
            "strategy": name,
            "model": args.model,
            "pairing": args.pairing,
            "framework_step_ms": res.a_step_s * 1e3,
            "bare_step_ms": res.b_step_s * 1e3,
            "ratio": res.ratio,
            "ci95_low": res.ci95_low,
            "ci95_high": res.ci95_high,
            "rounds": res.rounds,
            "threads": torch.get_num_threads(),
            "target": verdict(res.ci95_low, res.ci95_high),
        }
        rows.append(row)
        ci = "n/a" if res.ci95_low is None else f"{res.ci95_low:.3f}-{res.ci95_high:.3f}"
        print(
            f"{name:<12}{row['framework_step_ms']:>14.2f}{row['bare_step_ms']:>10.2f}"
            f"{row['ratio']:>8.3f}  "
            f"{ci:<13}  {row['target']}"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()

"""Benchmark: recompute_lab's training step vs a bare hand-written PyTorch loop (target ratio <= 1.02).

To run:  python experiments/bench_overhead.py [--model tiny] [--strategies none,full] [--repeats 5] [--steps 30]

Both arms train the same model (recompute_lab.model, the same strategy applied), on the same batches, with the
same threads, AdamW settings, LR schedule and gradient clipping. Arm A is the framework: engine.run() from a
composed Hydra config (its per-step timer, logging hooks and progress bar off/on as configured). Arm B is a
plain loop written here. The arms alternate (A, B, A, B, ...) so drift of a noisy machine hits both; the table
gives the median over repeats of each arm's median step time, and their ratio. Writes a CSV with --csv.
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

from recompute_lab.data import Batches
from recompute_lab.engine import lr_lambda, run
from recompute_lab.model import build_model
from recompute_lab.recompute import STRATEGIES, RunShape, apply_strategy

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


def bare_step_s(cfg) -> float:
    """The hand-written loop: what a researcher would write without the framework."""
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model)
    apply_strategy(model, cfg.strategy, RunShape.of(cfg))
    o = cfg.optimizer
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, cfg.trainer.steps))
    data = Batches(cfg.data, cfg.model.vocab_size)
    batches = [data.get(step) for step in range(cfg.trainer.steps)]
    times = []
    model.train()
    for idx, targets in batches:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[cfg.trainer.warmup_steps:])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--strategies", default="none,full")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides, e.g. data.seq_len=128")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    names = args.strategies.split(",")
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        sys.exit(f"unknown strategies {unknown}; valid: {', '.join(sorted(STRATEGIES))}")
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model={args.model}, "
          f"{args.steps} steps x {args.repeats} interleaved repeats")
    print(f"{'strategy':<12}{'framework ms':>14}{'bare ms':>10}{'ratio':>8}")
    for name in names:
        cfg = compose_cfg([f"model={args.model}", f"+strategy={name}", f"trainer.steps={args.steps}",
                           "logger=none", "trainer.progress=false", *args.extra])
        fw, bare, ratios = [], [], []
        for _ in range(args.repeats):
            a, b = framework_step_s(cfg), bare_step_s(cfg)
            fw.append(a)
            bare.append(b)
            ratios.append(a / b)
        row = {"strategy": name, "model": args.model, "framework_step_ms": statistics.median(fw) * 1e3,
               "bare_step_ms": statistics.median(bare) * 1e3, "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios), "repeats": args.repeats}
        rows.append(row)
        print(f"{name:<12}{row['framework_step_ms']:>14.2f}{row['bare_step_ms']:>10.2f}{row['ratio_median']:>8.3f}"
              f"   (range {row['ratio_min']:.3f}-{row['ratio_max']:.3f})")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()

"""Benchmark: the budget planner vs every fixed strategy that meets the same activation budget.

To run:  python experiments/bench_budget.py [OUT_DIR] [--model small] [--seq-len 128] [--batch 4]
         [--repeats 5]
         (OUT_DIR defaults to experiments/out/, git-ignored; 29 min on 2 CPU cores shared with other
         work)

For each attention backend (eager, sdpa) and each budget from 10% to 100% of `none`'s activation
bytes:
- the budget plan (objective flops) is solved from one probe and applied to a fresh model;
- every fixed strategy (none, full, selective variants, layers, sqrt, op, regions) is applied to a
fresh model;
- each model is measured by the planner's own cost model on the whole model (activation bytes,
recompute FLOPs,
  pointwise bytes; recompute_lab.budget.measure_step) and timed: median wall time of forward +
  backward over
  --repeats steps after one warm-up. FLOP overhead = recompute FLOPs / (forward + backward FLOPs of
  `none`);
  time overhead = step time / `none`'s step time - 1.
Prints a table (plan vs the cheapest fitting fixed strategy, by FLOPs and by measured time), writes
budget.csv (one row per budget x strategy) and budget_pareto.png (overhead vs activation bytes).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch.utils.flop_counter import FlopCounterMode

from recompute_lab.strategies import budget as B
from recompute_lab.model.gpt import build_model
from recompute_lab.config import ConfigError
from recompute_lab.strategies import apply_strategy, parse_options
from recompute_lab.config.spec import RunSpec

CONF = str(Path(__file__).resolve().parent.parent / "conf")
FIXED = [
    ("none", ["+strategy=none"]),
    ("full", ["+strategy=full"]),
    ("selective", ["+strategy=selective"]),
    ("selective-mlp", ["+strategy=selective", "strategy.modules=[mlp]"]),
    ("selective-attn+mlp", ["+strategy=selective", "strategy.modules=[attn,mlp]"]),
    ("layers-block2", ["+strategy=layers", "strategy.method=block", "strategy.num_layers=2"]),
    ("layers-block4", ["+strategy=layers", "strategy.method=block", "strategy.num_layers=4"]),
    ("layers-every2", ["+strategy=layers", "strategy.method=every", "strategy.every=2"]),
    ("layers-uniform2", ["+strategy=layers", "strategy.method=uniform", "strategy.num_layers=2"]),
    ("sqrt", ["+strategy=sqrt"]),
    ("op", ["+strategy=op"]),
    ("op-every-other-mm", ["+strategy=op", "strategy.every_other_mm=true"]),
    ("regions", ["+strategy=regions"]),
]


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def step_time(model, batch: int, seq: int, vocab: int, repeats: int, reference=None) -> float:
    """Median forward + backward time; with ``reference`` (the `none` model), the median of the
    ratios
    model / reference over steps run alternately, times the reference's median, so a shared
    machine's drift
    hits both (the ratio, not the absolute time, is what the overheads use)."""
    idx = torch.randint(0, vocab, (batch, seq))

    def one(m) -> float:
        t0 = time.perf_counter()
        m(idx, idx).backward()
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    one(model)  # warm-up
    if reference is None:
        return statistics.median(one(model) for _ in range(repeats))
    pairs = [(one(model), one(reference)) for _ in range(repeats)]
    return statistics.median(a / b for a, b in pairs) * REFERENCE_S[0]


REFERENCE_S = [1.0]  # `none`'s median step time, set once per attention backend


def forward_flops(model, args) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=B.CPU_SDPA_FLOPS)
    with counter, torch.no_grad():
        model(torch.zeros(args.batch, args.seq_len, dtype=torch.long))
    return counter.get_total_flops()


def measure(model, args, cfg, none: B.Measured | None) -> dict:
    m = B.measure_step(model, args.batch, args.seq_len)
    model.zero_grad(set_to_none=True)
    base = none or m
    return {
        "bytes": m.activation_bytes,
        "recompute_flops": m.backward_flops - base.backward_flops,
        "pointwise_bytes": m.pointwise_bytes - base.pointwise_bytes,
        "step_s": step_time(
            model,
            args.batch,
            args.seq_len,
            cfg.model.vocab_size,
            args.repeats,
            None if none is None else REFERENCE[0],
        ),
    }


REFERENCE: list = [None]  # the `none` model of the current backend, timed alongside every other one


def bench_attention(attention: str, args) -> list[dict]:
    base = [
        f"model={args.model}",
        f"model.attention={attention}",
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch}",
        *args.override,
    ]
    rows, fixed = [], {}
    for name, overrides in FIXED:
        cfg = compose_cfg([*base, *overrides])
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape())
        fixed[name] = measure(model, args, cfg, fixed.get("none", {}).get("_measured"))
        if name == "none":
            REFERENCE[0], REFERENCE_S[0] = model, fixed[name]["step_s"]
            fixed[name]["_measured"] = B.measure_step(model, args.batch, args.seq_len)
            model.zero_grad(set_to_none=True)
            fixed[name]["fwd_bwd_flops"] = (
                forward_flops(model, args) + fixed[name]["_measured"].backward_flops
            )
    none = fixed["none"]
    cfg = compose_cfg([*base, "+strategy=budget"])
    t0 = time.perf_counter()
    probed = B.probe_model(build_model(cfg.model).train(), RunSpec.of(cfg).shape())
    probe_s = time.perf_counter() - t0
    plans: dict[tuple, dict] = {}
    for k in range(1, 11):
        budget = int(k / 10 * none["bytes"])
        cfg = compose_cfg([*base, "+strategy=budget", f"strategy.budget_bytes={budget}"])
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        try:
            plan = B.solve(
                model, parse_options(cfg.strategy), RunSpec.of(cfg).shape(), probed
            ).to_dict()
        except ConfigError:
            plan = None
        if plan is not None:
            key = tuple(plan["chosen"])
            if key not in plans:
                plans[key] = measure(model, args, cfg, none["_measured"])
            got = {**plans[key], "strategy": "budget", "chosen": "+".join(sorted(set(key)))}
            assert got["bytes"] <= budget, (budget, got)
            rows.append(_row(attention, k / 10, budget, got, none))
        for name, fx in fixed.items():
            if fx["bytes"] <= budget:
                rows.append(
                    _row(attention, k / 10, budget, {**fx, "strategy": name, "chosen": ""}, none)
                )
    print(f"[{attention}] probe of {len(probed.options)} options: {probe_s:.1f} s")
    return rows


def _row(attention: str, fraction: float, budget: int, m: dict, none: dict) -> dict:
    return {
        "attention": attention,
        "fraction": fraction,
        "budget_bytes": budget,
        "strategy": m["strategy"],
        "chosen": m["chosen"],
        "activation_bytes": m["bytes"],
        "recompute_flops": m["recompute_flops"],
        "pointwise_bytes": m["pointwise_bytes"],
        "flop_overhead": m["recompute_flops"] / none["fwd_bwd_flops"],
        "step_s": m["step_s"],
        "time_overhead": m["step_s"] / none["step_s"] - 1,
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'attn':6} {'budget':>6} | {'plan flops%':>11} {'plan time%':>10} | "
        f"{'best fixed (flops)':>22} "
        f"{'flops%':>7} | {'best fixed (time)':>20} {'time%':>7}"
    )
    keys = sorted({(r["attention"], r["fraction"]) for r in rows})
    for attention, fraction in keys:
        at = [r for r in rows if (r["attention"], r["fraction"]) == (attention, fraction)]
        plan = next((r for r in at if r["strategy"] == "budget"), None)
        fixed = [r for r in at if r["strategy"] != "budget"]
        pf = (
            f"{100 * plan['flop_overhead']:10.1f}% {100 * plan['time_overhead']:9.1f}%"
            if plan
            else f"{'infeasible':>21}"
        )
        if fixed:
            bf = min(fixed, key=lambda r: (r["recompute_flops"], r["pointwise_bytes"]))
            bt = min(fixed, key=lambda r: r["step_s"])
            fx = (
                f"{bf['strategy']:>22} {100 * bf['flop_overhead']:6.1f}% | {bt['strategy']:>20} "
                f"{100 * bt['time_overhead']:6.1f}%"
            )
        else:
            fx = f"{'none fits':>22} {'':7} | {'':20} {'':7}"
        print(f"{attention:6} {fraction:6.0%} | {pf} | {fx}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attentions = sorted({r["attention"] for r in rows})
    fig, axes = plt.subplots(len(attentions), 2, figsize=(11, 4 * len(attentions)), squeeze=False)
    for row_axes, attention in zip(axes, attentions):
        at = [r for r in rows if r["attention"] == attention]
        none_bytes = max(r["activation_bytes"] for r in at)
        for ax, metric, label in zip(
            row_axes,
            ("flop_overhead", "time_overhead"),
            ("recompute FLOP overhead", "measured time overhead"),
        ):
            fixed = {r["strategy"]: r for r in at if r["strategy"] != "budget"}
            for name, r in fixed.items():
                ax.scatter(r["activation_bytes"] / none_bytes, 100 * r[metric], marker="x")
                ax.annotate(name, (r["activation_bytes"] / none_bytes, 100 * r[metric]), fontsize=7)
            plan = sorted(
                {(r["activation_bytes"], r[metric]) for r in at if r["strategy"] == "budget"}
            )
            ax.plot(
                [b / none_bytes for b, _ in plan],
                [100 * v for _, v in plan],
                "o-",
                color="C3",
                label="budget plan",
            )
            ax.set_xlabel("activation bytes / none's")
            ax.set_ylabel(f"{label} (%)")
            ax.set_title(f"{attention}: {label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(Path(__file__).resolve().parent / "out"))
    p.add_argument("--model", default="small")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--attention", default="eager,sdpa")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--override", action="append", default=[], help="extra Hydra override, e.g. model.n_layer=4"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for a in args.attention.split(",") for r in bench_attention(a, args)]
    print_table(rows)
    with open(out / "budget.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "budget_pareto.png")
    print(f"wrote {out / 'budget.csv'} and {out / 'budget_pareto.png'}")


if __name__ == "__main__":
    main()

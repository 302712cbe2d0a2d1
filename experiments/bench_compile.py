"""Benchmark: recompute_lab's budget planner beside torch.compile's memory-budget partitioner and
the best fixed
strategy, at activation budgets from 10% to 100% of `none`'s saved bytes.

To run:  python experiments/bench_compile.py     (~2 min on 2 CPU cores; writes
         experiments/figures/compile)
         python experiments/bench_compile.py --from-raw experiments/figures/compile/raw.json
         (table, figure only)

Points, all on `tiny` (fp32, CPU, one micro-batch of --batch x --seq-len), each a fresh model from
seed 0:
  fixed             every fixed strategy, eager
  planner           the eager `budget` plan for budget_bytes = f x none's saved bytes, f = 0.1 ..
                    1.0
  partitioner       torch.compile of the whole model (aot_eager_decomp_partition: the min-cut
                    partitioner, eager
                    kernels), strategy none, activation_memory_budget = k for each k in KNOBS
  planner+compile   the planner's plan at f, then each block compiled (partitioner budget 1.0)
Measured at each point: saved bytes (compiled: recompute_lab.measure.compiled.count_saved, a
saved_tensors_hooks pack
hook; eager: recompute_lab.measure.memory's count of live storages, which also sees op-level SAC's
cache; parameters
excluded, storages once in both), recompute FLOPs (eager: the
meta-replica count of recompute_lab.measure.flops; compiled: FLOPs of backward-graph nodes that
depend on no gradient),
the step (forward + backward) time against eager `none` in paired ABBA rounds with a 95% interval
(recompute_lab.measure.timing), compile time (first compiled step), and the largest gradient
difference to eager `none`.

Table (table.csv, table.md): for each f, the planner's and planner+compile's own point at f; for the
partitioner
and the fixed strategies the point with the fewest recompute FLOPs among those whose measured saved
bytes fit
f x none (the partitioner's knob is a fraction of its own graph's bytes, not of none's, so its best
knob for each
budget is picked after the fact: this favours the partitioner). Figure (frontier.png): saved bytes
vs recompute
FLOPs per family, and time overhead with intervals. raw.json holds every point; manifest.json the
sha256 of each
file; tests/unit/test_compile_figures.py re-derives the table and figure from raw.json and
remeasures two points.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path
from recompute_lab.config.spec import RunSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "experiments" / "figures" / "compile"
FRACTIONS = [round(0.1 * i, 1) for i in range(1, 11)]
KNOBS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02]
FIXED = [
    ("none", []),
    ("full", ["+strategy=full"]),
    ("selective", ["+strategy=selective"]),
    ("selective-mlp", ["+strategy=selective", "strategy.modules=[mlp]"]),
    ("selective-attn+mlp", ["+strategy=selective", "strategy.modules=[attn,mlp]"]),
    ("layers-block1", ["+strategy=layers", "strategy.method=block", "strategy.num_layers=1"]),
    ("layers-uniform2", ["+strategy=layers", "strategy.method=uniform", "strategy.num_layers=2"]),
    ("op", ["+strategy=op"]),
    ("op-every-other-mm", ["+strategy=op", "strategy.every_other_mm=true"]),
]
FAMILIES = ("planner", "partitioner", "planner+compile", "fixed")
# the literal match: activation_memory_budget set to the budget fraction
AT_KNOB = "partitioner at knob = budget"
FILES = ("raw.json", "table.csv", "table.md", "frontier.png")
DETERMINISTIC = ("saved_bytes", "recompute_flops")  # what a remeasurement must reproduce exactly


def shape_overrides(args) -> list[str]:
    from recompute_lab.config import CONF_DIR

    local_off = (
        ["~local"] if (Path(CONF_DIR) / "local" / "default.yaml").exists() else []
    )  # machine settings off
    return [
        "model=tiny",
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch}",
        *local_off,
    ]


def build(overrides: list[str], compile_knob=None, scope: str = "model"):
    """(cfg, model, plan, session) of a fresh `tiny` from seed 0: strategy applied, then compiled
    when
    ``compile_knob`` is not False (None: the partitioner's default budget)."""
    import torch

    from recompute_lab.measure import compiled
    from recompute_lab.cli.overrides import compose_run_config
    from recompute_lab.model.gpt import build_model
    from recompute_lab.strategies import apply_strategy

    knob = [] if compile_knob is None else [f"compile.memory_budget={compile_knob}"]
    comp = (
        []
        if compile_knob is False
        else ["compile=eager_partition", f"compile.scope={scope}", *knob]
    )
    cfg = RunSpec.of(compose_run_config([*overrides, *comp]))
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu", torch.float32).train()
    plan = apply_strategy(model, cfg.strategy, cfg.shape())
    session = None
    if compile_knob is not False:
        session = compiled.Session(cfg.compile)
        session.apply(model)
    return cfg, model, plan, session


def batch(args):
    import torch

    g = torch.Generator().manual_seed(1234)
    return tuple(torch.randint(0, 256, (args.batch, args.seq_len), generator=g) for _ in range(2))


def step_of(model, data):
    """One forward + backward of ``model`` on ``data``, returning its wall time (the arms of
    run_paired)."""

    def step(_i: int) -> float:
        t0 = time.perf_counter()
        model(*data).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def measure(cfg, model, plan, session, ref, args) -> dict:
    """Saved bytes, recompute FLOPs, paired time vs eager none (``ref``: its model and gradients),
    compile time."""
    from recompute_lab.measure import compiled
    from recompute_lab.measure import flops
    from recompute_lab.measure.timing import run_paired

    data = batch(args)
    compile_s = None
    if session is not None:
        session.first_step(lambda: model(*data).backward(), "bench")
        compile_s = session.first_step_s
        model.zero_grad(set_to_none=True)
        session.recorder.reset()
    counted = saved_bytes(model, data, session is not None)
    counted["output"].backward()
    grads = dict(model.named_parameters())
    grad_diff = max(
        ((grads[n].grad - g).abs().max() / g.abs().max()).item() for n, g in ref["grads"].items()
    )
    model.zero_grad(set_to_none=True)
    if session is not None:
        graphs = compiled.graph_measurements(session.recorder)
        # The graphs must hold the compiled scope's whole forward: a graph break would hide
        # recompute FLOPs.
        expected = ref["forward_flops"] if session.scope == "model" else ref["blocks_forward_flops"]
        if graphs["forward"] != expected:
            raise RuntimeError(
                f"compiled graphs hold {graphs['forward']} of {expected} forward FLOPs"
            )
        recompute = graphs[
            "recompute"
        ]  # block scope: the eager rest (embedding, head, loss) recomputes nothing
    else:
        recompute = flops.count_step_flops(cfg, plan=plan)["recompute"]
    paired = (
        run_paired(
            step_of(model, data),
            step_of(ref["model"], data),
            min_rounds=6,
            max_rounds=args.rounds,
            target_rel_width=0.04,
            warmup_rounds=2,
        )
        if args.rounds and ref["model"] is not model
        else None
    )
    return {
        "saved_bytes": counted["bytes"],
        "recompute_flops": int(recompute),
        "grad_rel_diff": grad_diff,
        "compile_s": compile_s,
        "time_ratio": paired and paired.ratio,
        "time_ci95_low": paired and paired.ci95_low,
        "time_ci95_high": paired and paired.ci95_high,
        "time_rounds": paired and paired.rounds,
    }


def saved_bytes(model, data, is_compiled: bool) -> dict:
    """Bytes kept for backward after one forward: on a compiled model the pack-hook count (its saved
    tensors are
    the compiled autograd function's); eager, every storage the forward made that is still alive
    (op-level SAC
    keeps its saved outputs in a cache that saved_tensors_hooks never sees;
    recompute_lab.measure.memory)."""
    from recompute_lab.measure import compiled
    from recompute_lab.measure import memory as measure

    if is_compiled:
        counted = compiled.count_saved(model, lambda: model(*data))
        return {**counted, "bytes": counted["total"]}
    counted = measure.saved_tensors(model, lambda: model(*data))
    return {**counted, "bytes": counted["resident_total"]}


def reference(args) -> dict:
    """Eager none: the baseline model every arm is timed against, its saved bytes, gradients and
    FLOPs."""
    from recompute_lab.measure import flops

    cfg, model, _, _ = build(shape_overrides(args), compile_knob=False)
    data = batch(args)
    counted = saved_bytes(model, data, False)
    counted["output"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    counted_flops = flops.count_step_flops(cfg)
    blocks = cfg.model.n_layer * flops.module_forward_flops(cfg, args.batch, args.seq_len)["block"]
    return {
        "blocks_forward_flops": blocks,
        "model": model,
        "grads": grads,
        "saved_bytes": counted["bytes"],
        "forward_flops": counted_flops["forward"],
        "fwd_bwd_flops": counted_flops["forward"] + counted_flops["backward"],
    }


def planner_overrides(args, fraction: float, none_bytes: int) -> list[str]:
    return [
        *shape_overrides(args),
        "+strategy=budget",
        f"strategy.budget_bytes={int(fraction * none_bytes)}",
    ]


def run_points(args) -> dict:
    from recompute_lab.config import ConfigError

    ref = reference(args)
    none_bytes = ref["saved_bytes"]
    points = []

    def add(family, label, key, cfg_model_plan_session):
        t0 = time.perf_counter()
        p = {"family": family, "label": label, **key, **measure(*cfg_model_plan_session, ref, args)}
        points.append(p)
        print(
            f"{family:16} {label:28} saved {p['saved_bytes']:>9,} B  recompute "
            f"{p['recompute_flops']:>11,}  "
            f"time x{p['time_ratio'] or 1:.3f}  ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )

    for name, over in FIXED:
        add("fixed", name, {}, build([*shape_overrides(args), *over], compile_knob=False))
    for knob in KNOBS:
        add(
            "partitioner",
            f"activation_memory_budget={knob}",
            {"knob": knob},
            build(shape_overrides(args), compile_knob=knob),
        )
    for fraction in FRACTIONS:
        try:
            built = build(planner_overrides(args, fraction, none_bytes), compile_knob=False)
        except ConfigError as e:  # below full recomputation's bytes: no plan fits
            print(f"planner          f={fraction}: {e}")
            continue
        chosen = "+".join(built[2].details["chosen"])
        add("planner", chosen, {"fraction": fraction}, built)
        add(
            "planner+compile",
            chosen,
            {"fraction": fraction},  # the plan's blocks compiled (torchtitan's way)
            build(planner_overrides(args, fraction, none_bytes), compile_knob=None, scope="block"),
        )
    return {
        "settings": {
            "model": "tiny",
            "seq_len": args.seq_len,
            "batch": args.batch,
            "threads": args.threads,
            "fractions": FRACTIONS,
            "knobs": KNOBS,
        },
        "none": {"saved_bytes": none_bytes, "fwd_bwd_flops": ref["fwd_bwd_flops"]},
        "points": points,
    }


# --- derived files: pure functions of raw.json
# ------------------------------------------------------------------


def best(points: list[dict], family: str, fraction: float, none_bytes: int):
    """The family's point for budget ``fraction``: its own (planner, planner+compile; the
    partitioner with its knob
    set to ``fraction`` for AT_KNOB, which may not fit) or the cheapest that fits."""
    if family == AT_KNOB:
        return next(
            (p for p in points if p["family"] == "partitioner" and p["knob"] == fraction), None
        )
    own = [p for p in points if p["family"] == family and p.get("fraction") == fraction]
    if family in ("planner", "planner+compile"):
        return own[0] if own else None
    fits = [
        p for p in points if p["family"] == family and p["saved_bytes"] <= fraction * none_bytes
    ]
    return min(fits, key=lambda p: (p["recompute_flops"], p["saved_bytes"])) if fits else None


def table(raw: dict) -> list[dict]:
    from recompute_lab.measure.timing import describe

    none_bytes, model_flops = raw["none"]["saved_bytes"], raw["none"]["fwd_bwd_flops"]
    rows = []
    for f in raw["settings"]["fractions"]:
        row = {"budget": f, "budget_bytes": int(f * none_bytes)}
        for fam in (*FAMILIES, AT_KNOB):
            p = best(raw["points"], fam, f, none_bytes)
            row.update(
                {
                    f"{fam}_label": p and p["label"],
                    f"{fam}_saved_bytes": p and p["saved_bytes"],
                    f"{fam}_saved_pct": p and round(100 * p["saved_bytes"] / none_bytes, 1),
                    f"{fam}_recompute_pct": p
                    and round(100 * p["recompute_flops"] / model_flops, 1),
                    f"{fam}_time": p
                    and (
                        describe(p["time_ratio"], p["time_ci95_low"], p["time_ci95_high"])
                        if p["time_ratio"] is not None
                        else "baseline"
                    ),
                }
            )
        at = row[f"{AT_KNOB}_saved_bytes"]
        row[f"{AT_KNOB}_fits"] = None if at is None else at <= row["budget_bytes"]
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def markdown(raw: dict, rows: list[dict]) -> str:
    s = raw["settings"]
    head = (
        f"Saved bytes (% of eager none's {raw['none']['saved_bytes']:,} B) / recompute FLOPs (% of "
        f"forward + "
        f"backward) / step time vs eager none, `tiny` batch {s['batch']} x seq {s['seq_len']}, "
        f"fp32, CPU "
        f"({s['threads']} threads). Generated by experiments/bench_compile.py from raw.json.\n\n"
    )
    cols = ["budget", *FAMILIES, "partitioner, knob = budget: saved (fits?)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{100 * r['budget']:.0f}%"]
        for fam in FAMILIES:
            if r[f"{fam}_label"] is None:
                cells.append("no point fits")
                continue
            name = "" if fam in ("planner", "planner+compile") else f"{r[fam + '_label']}: "
            cells.append(
                f"{name}{r[fam + '_saved_pct']}% / +{r[fam + '_recompute_pct']}% / "
                f"{r[fam + '_time']}"
            )
        fits = r[f"{AT_KNOB}_fits"]
        cells.append(
            "-"
            if fits is None
            else f"{r[AT_KNOB + '_saved_pct']}% ({'yes' if fits else 'no: over budget'})"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(raw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recompute_lab.analysis import style

    # the project's figure style (and the same pixels whether or not another figure set it first)
    style.apply()
    none_bytes, model_flops = raw["none"]["saved_bytes"], raw["none"]["fwd_bwd_flops"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {
        "planner": ("o-", "C3"),
        "partitioner": ("s--", "C0"),
        "planner+compile": ("^-", "C2"),
        "fixed": ("x", "C7"),
    }
    for fam in FAMILIES:
        pts = sorted(
            (p for p in raw["points"] if p["family"] == fam), key=lambda p: p["saved_bytes"]
        )
        xs = [100 * p["recompute_flops"] / model_flops for p in pts]
        ys = [100 * p["saved_bytes"] / none_bytes for p in pts]
        marker, color = styles[fam]
        ax.plot(xs, ys, marker, color=color, label=fam, ms=5)
        timed = [p for p in pts if p["time_ratio"] is not None]
        bx.errorbar(
            [100 * p["saved_bytes"] / none_bytes for p in timed],
            [100 * (p["time_ratio"] - 1) for p in timed],
            yerr=[
                [100 * (p["time_ratio"] - p["time_ci95_low"]) for p in timed],
                [100 * (p["time_ci95_high"] - p["time_ratio"]) for p in timed],
            ],
            fmt=marker[0],
            color=color,
            label=fam,
            ms=4,
            capsize=2,
        )
    ax.set_xlabel("recompute FLOPs (% of forward + backward)")
    ax.set_ylabel("saved bytes (% of eager none)")
    ax.set_title("frontiers: saved bytes vs recompute FLOPs")
    bx.axhline(0, color="k", lw=0.5)
    bx.set_xlabel("saved bytes (% of eager none)")
    bx.set_ylabel("step time vs eager none (%, 95% CI)")
    bx.set_title("time overhead (paired ABBA)")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_derived(raw: dict, out: Path) -> None:
    """table.csv, table.md, frontier.png and manifest.json from ``raw`` (raw.json already in
    ``out``)."""
    import matplotlib
    import torch

    rows = table(raw)
    write_csv(rows, out / "table.csv")
    (out / "table.md").write_text(markdown(raw, rows))
    plot(raw, out / "frontier.png")
    man = {
        "generated_by": "python experiments/bench_compile.py",
        "matplotlib": matplotlib.__version__,
        "torch": torch.__version__,
        "sha256": {n: sha(out / n) for n in FILES},
    }
    (out / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--rounds", type=int, default=24, help="max ABBA rounds per point (>= 6; 0: no timing)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--from-raw",
        type=Path,
        default=None,
        help="only re-derive the table and figure from this file",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_raw is not None:
        raw = json.loads(args.from_raw.read_text())
    else:
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        raw = run_points(args)
        print(f"{len(raw['points'])} points in {time.perf_counter() - t0:.0f} s")
    if args.from_raw is None or args.from_raw.resolve() != (args.out / "raw.json").resolve():
        (args.out / "raw.json").write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    write_derived(raw, args.out)
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

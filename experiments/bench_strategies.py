"""Benchmark: every strategy side by side — saved activation bytes, recompute FLOP overhead, time
overhead.

To run:  python experiments/bench_strategies.py [--model small] [--seq-lens 256,512,1024]
         [--attention eager,sdpa]
                                                [--steps 4] [--max-rounds 20] [--csv
                                                experiments/out/bench.csv]

For each (attention backend, seq_len) the strategies run one after another in this process with the
same model,
batch and threads. Activation ratio = a strategy's measured saved bytes / `none`'s. Time overhead =
the run's
own paired measurement (results.json time.overhead, recompute_lab.measure.overhead): after training,
the strategy's step
and `none`'s step alternate in ABBA rounds on the same batches, median ratio with its 95% interval;
it includes
what FLOP counting misses (recomputed norms, activations, softmax, dropout; op SAC's dispatch). `op`
and
`regions` (default plans) save and recompute the same things, one through a TorchDispatchMode (SAC),
one through
torch_remat regions: their time columns compare the two mechanisms' CPU overhead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import get, print_table, run_overrides, time_columns, write_csv  # noqa: E402

from recompute_lab.strategies import STRATEGIES  # noqa: E402

DEFAULT_ORDER = [
    "none",
    "full",
    "selective",
    "layers",
    "sqrt",
    "op",
    "regions",
    "offload",
    "budget",
]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--seq-lens", default="256,512,1024")
    ap.add_argument("--attention", default="eager,sdpa")
    ap.add_argument("--strategies", default=",".join(n for n in DEFAULT_ORDER if n in STRATEGIES))
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument(
        "--max-rounds",
        type=int,
        default=20,
        help="cap on each run's paired rounds (trainer.overhead)",
    )
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    names = args.strategies.split(",")
    if "none" not in names:
        names.insert(0, "none")  # the baseline of every ratio
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        sys.exit(f"unknown strategies {unknown}; valid: {', '.join(sorted(STRATEGIES))}")
    rows = []
    for attention in args.attention.split(","):
        for seq in [int(s) for s in args.seq_lens.split(",")]:
            base = None
            for name in names:
                res = run_overrides(
                    [
                        f"model={args.model}",
                        f"model.attention={attention}",
                        f"+strategy={name}",
                        f"data.seq_len={seq}",
                        f"data.batch_size={args.batch_size}",
                        f"trainer.steps={args.steps}",
                        "trainer.warmup_steps=1",
                        f"trainer.overhead.max_rounds={args.max_rounds}",
                        *args.extra,
                    ]
                )
                if res["status"] != "ok":
                    print(
                        f"{name} {attention} s={seq}: {res['status']} {res.get('error')}",
                        file=sys.stderr,
                    )
                    continue
                row = {
                    "model": args.model,
                    "attention": attention,
                    "seq_len": seq,
                    "strategy": name,
                    "activation_bytes": get(res, "memory.activation_bytes.measured"),
                    "activation_bytes_predicted": get(res, "memory.activation_bytes.predicted"),
                    "recompute_flop_overhead": res["flops"]["recompute_overhead"],
                    **time_columns(res["time"].get("overhead") or {}),
                }
                base = row if name == "none" else base
                row["activation_ratio"] = (
                    row["activation_bytes"] / base["activation_bytes"]
                    if base and row["activation_bytes"] and base["activation_bytes"]
                    else None
                )
                rows.append(row)
    print(
        f"model={args.model} batch={args.batch_size} steps={args.steps}; time: paired in-run vs "
        f"none, 95% CI"
    )
    print_table(
        rows,
        [
            ("attention", "attention", "s"),
            ("seq_len", "seq", "d"),
            ("strategy", "strategy", "s"),
            ("activation_bytes", "act bytes", ",.0f"),
            ("activation_ratio", "act/none", ".3f"),
            ("recompute_flop_overhead", "FLOP ovh", ".3f"),
            ("time_overhead", "time/none", ".3f"),
            ("time_words", "time overhead (95% CI)", "s"),
        ],
    )
    write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()

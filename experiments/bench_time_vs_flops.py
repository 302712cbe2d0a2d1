"""Benchmark: measured time overhead beside counted FLOP overhead for full / selective / layers, and
their ratio.

To run:  python experiments/bench_time_vs_flops.py [--model small] [--seq-len 512] [--batch-size 1]
                                                   [--strategies full,selective,layers] [--attention
                                                   sdpa]
                                                   [--max-rounds 20] [--csv
                                                   experiments/out/time_vs_flops.csv]

Each strategy is one run; its FLOP overhead is counted (recomputed FLOPs / (forward + backward),
FlopCounterMode)
and its time overhead is the run's own paired measurement against `none` (results.json
time.overhead: ABBA
rounds on the same batches, median ratio with a 95% interval). The last columns divide the time
overhead and its
interval by the FLOP overhead. On hardware where the step is compute-bound the two should agree
(ratio ~1) up to
the work FLOP counters do not see: recomputed pointwise ops (norms, activations, softmax, dropout,
residual adds)
and the checkpoint machinery itself. A ratio well above 1 says time is spent outside the matmuls;
below 1, that
the recomputed matmuls run faster than the step's average (or, with an interval that reaches 0,
nothing shown).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_overrides, time_columns, write_csv  # noqa: E402

from recompute_lab.strategies import STRATEGIES  # noqa: E402


def time_per_flop(flop_ovh: float, ratio, lo, hi) -> dict:
    """(time overhead) / (FLOP overhead), with the interval of the time overhead carried through."""
    if ratio is None or not flop_ovh:
        return {"time_per_flop": None, "time_per_flop_low": None, "time_per_flop_high": None}
    return {
        "time_per_flop": (ratio - 1) / flop_ovh,
        "time_per_flop_low": None if lo is None else (lo - 1) / flop_ovh,
        "time_per_flop_high": None if hi is None else (hi - 1) / flop_ovh,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--strategies", default="full,selective,layers")
    ap.add_argument(
        "--steps", type=int, default=2, help="training steps before the paired measurement"
    )
    ap.add_argument("--max-rounds", type=int, default=20)
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    names = args.strategies.split(",")
    unknown = [n for n in names if n not in STRATEGIES or n == "none"]
    if unknown:
        sys.exit(
            f"strategies {unknown} cannot be compared with none; valid: "
            f"{', '.join(sorted(set(STRATEGIES) - {'none'}))}"
        )
    rows = []
    for name in names:
        res = run_overrides(
            [
                f"model={args.model}",
                f"model.attention={args.attention}",
                f"+strategy={name}",
                f"data.seq_len={args.seq_len}",
                f"data.batch_size={args.batch_size}",
                f"trainer.steps={args.steps}",
                "trainer.warmup_steps=1",
                "trainer.overhead.baseline=none",
                f"trainer.overhead.max_rounds={args.max_rounds}",
                *args.extra,
            ]
        )
        if res["status"] != "ok":
            print(f"{name}: {res['status']} {res.get('error')}", file=sys.stderr)
            continue
        o = res["time"].get("overhead") or {}
        flop = res["flops"]["recompute_overhead"]
        rows.append(
            {
                "model": args.model,
                "attention": args.attention,
                "seq_len": args.seq_len,
                "strategy": name,
                "flop_overhead": flop,
                **time_columns(o),
                **time_per_flop(flop, o.get("ratio"), o.get("ci95_low"), o.get("ci95_high")),
                "threads": res["env"].get("num_threads"),
                "device": res["env"].get("device_name"),
            }
        )
    print(
        f"model={args.model} attention={args.attention} s={args.seq_len} b={args.batch_size}: time "
        f"overhead "
        "(paired in-run vs none, 95% CI) beside counted FLOP overhead"
    )
    print_table(
        rows,
        [
            ("strategy", "strategy", "s"),
            ("flop_overhead", "FLOP ovh", ".3f"),
            ("time_overhead", "time/none", ".3f"),
            ("time_per_flop", "time/FLOP", ".2f"),
            ("time_per_flop_low", "low", ".2f"),
            ("time_per_flop_high", "high", ".2f"),
            ("time_words", "time overhead (95% CI)", "s"),
        ],
    )
    write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()

"""Compare every byte, FLOP and loss figure of two sweep folders run by the same commands (e.g.
before and after
a refactor): prints one line per difference and exits 1 if there is any.

    python experiments/compare_sweeps.py multirun/BEFORE multirun/AFTER

Runs are paired by their folder path relative to the sweep folder (Hydra names job folders by their
overrides). Compared: status; memory activation / peak / model-state figures (predicted and
measured, by
module); FLOPs per step (counted and predicted); the plan's recomputed modules and chosen options;
the loss
history. Times are not compared (they are noise between runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = (
    "status",
    "memory.activation_bytes.predicted",
    "memory.activation_bytes.measured",
    "memory.activation_bytes.hooked",
    "memory.activation_bytes.by_module",
    "memory.activation_bytes.by_op",
    "memory.activation_bytes.logits",
    "memory.activation_bytes.checkpoint_inputs",
    "memory.peak_bytes.predicted",
    "memory.peak_bytes.measured",
    "memory.peak_bytes.by_category",
    "memory.model_state_bytes.predicted",
    "memory.model_state_bytes.measured",
    "memory.model_state_bytes.per_param",
    "flops.per_step",
    "flops.predicted_per_step",
    "flops.recompute_overhead",
    "strategy.recomputed",
    "strategy.regions",
    "strategy.chosen",
    "strategy.predicted_activation_bytes",
    "model.params",
    "loss.history",
)


def get(d, path: str):
    for part in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def load(folder: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(folder)): json.loads(p.read_text())
        for p in sorted(folder.rglob("results.json"))
    }


def compare(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    diffs = [
        f"{run}: only in {'before' if run in before else 'after'}"
        for run in sorted(set(before) ^ set(after))
    ]
    for run in sorted(set(before) & set(after)):
        for key in KEYS:
            a, b = get(before[run], key), get(after[run], key)
            if a != b:
                diffs.append(f"{run}: {key}: {json.dumps(a)[:120]} -> {json.dumps(b)[:120]}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    before, after = load(args.before), load(args.after)
    if not before or not after:
        print("no results.json under one of the folders", file=sys.stderr)
        return 2
    diffs = compare(before, after)
    print(
        "\n".join(diffs)
        if diffs
        else f"{len(before)} runs: every compared figure identical ({len(KEYS)} keys each)"
    )
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers for the experiment scripts: compose a run config, run it in-process, print/write
tables."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from recompute_lab.config import CONF_DIR as CONF
from recompute_lab.run.engine import run
from recompute_lab.measure.timing import Paired, describe, run_paired


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_overrides(overrides: list[str], run_dir: Optional[Path] = None) -> dict:
    """One training run (logger off, no progress bar) in ``run_dir`` or a temporary folder; its
    results."""
    cfg = compose_cfg([*overrides, "logger=none", "trainer.progress=false"])
    if run_dir is not None:
        return run(cfg, run_dir)
    with tempfile.TemporaryDirectory() as d:
        return run(cfg, Path(d))


def get(d: dict, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict) or d.get(key) is None:
            return default
        d = d[key]
    return d


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); None prints as n/a."""
    widths = [max(len(h), 10) for _, h, _ in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for row in rows:
        cells = []
        for (key, _, fmt), w in zip(columns, widths):
            v = row.get(key)
            cells.append(("n/a" if v is None else format(v, fmt)).rjust(w))
        print("  ".join(cells))


def write_csv(rows: list[dict], path: Optional[str]) -> None:
    if not path or not rows:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def time_columns(o: dict) -> dict:
    """A run's paired time overhead (results.json time.overhead) as table columns: ratio, interval,
    rounds, words."""
    return {
        "time_overhead": o.get("ratio"),
        "time_ci95_low": o.get("ci95_low"),
        "time_ci95_high": o.get("ci95_high"),
        "time_rounds": o.get("rounds"),
        "time_words": o.get("skipped")
        or describe(o.get("ratio"), o.get("ci95_low"), o.get("ci95_high")),
    }


def fixed_rounds(step_a, step_b, rounds: int) -> Paired:
    """recompute_lab.measure.timing.run_paired for exactly ``rounds`` ABBA rounds after one warmup
    round (a benchmark's table compares figures of equal effort, so no early stop)."""
    return run_paired(
        step_a,
        step_b,
        min_rounds=rounds,
        max_rounds=rounds,
        target_rel_width=0.0,
        warmup_rounds=1,
    )

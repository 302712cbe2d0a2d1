"""A sweep of estimates (``recompute-lab-estimate -m ...``: one estimate.json per job) as one
table of predictions across the swept axes.

The swept axes are the config keys whose values differ between the jobs (model, strategy,
data.seq_len, precision, ...), plus the sequence length when a job priced several
(estimate.seq_lens: one row per length). Each row: those axes, then what the estimate predicts:
parameters, model state, saved activations (and Korthikanti's 16-bit line), the step's peak and the
phase it falls in. Written as estimates.csv (exact numbers), estimates.md and estimates.tex
(booktabs), sorted by the axes. Nothing is measured here, and the table says so.

Layer: analysis (no torch).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from recompute_lab.analysis.aggregate import fmt_bytes, precision_label, strategy_label

# Config keys that never change a prediction (where the job wrote, logging, timing settings).
NOT_AXES = ("logger.", "trainer.progress", "trainer.overhead.", "estimate.out", "hydra.")
PREDICTIONS = (
    "params",
    "model_state_bytes",
    "act_bytes",
    "korthikanti_bytes",
    "peak_bytes",
    "peak_phase",
)


def find_estimates(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("estimate.json") if p.is_file())


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _get(d: Any, path: str) -> Any:
    for k in path.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def load_estimates(folder: Path) -> tuple[list[str], list[dict]]:
    """(swept axes, rows) of every estimate.json under ``folder``; unreadable files are skipped
    with a row that says so."""
    folder = Path(folder)
    recs = []
    for path in find_estimates(folder):
        run = str(path.parent.relative_to(folder)) if path.parent != folder else "."
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError) as e:
            recs.append((run, None, f"{type(e).__name__}: {e}"[:200]))
            continue
        recs.append((run, rec, None))
    flats = {
        run: {
            k: json.dumps(v, sort_keys=True)
            for k, v in _flat(rec.get("config") or {}).items()
            if not k.startswith(NOT_AXES)
        }
        for run, rec, _ in recs
        if rec is not None
    }
    keys = sorted({k for f in flats.values() for k in f})
    axes = [k for k in keys if len({f.get(k) for f in flats.values()}) > 1]
    rows = []
    for run, rec, err in recs:
        if rec is None:
            rows.append({"run": run, "error": err})
            continue
        cfg = rec.get("config") or {}
        series = rec.get("series") if isinstance(rec.get("series"), list) else []
        points = series or [
            {
                "seq_len": _get(cfg, "data.seq_len"),
                "batch_size": _get(cfg, "data.batch_size"),
                "activation_bytes": _get(rec, "memory.activation_bytes"),
                "peak_bytes": _get(rec, "memory.peak_bytes"),
            }
        ]
        for pt in points:
            row: dict[str, Any] = {"run": run, "error": None}
            for ax in axes:
                row[ax] = _get(cfg, ax)
            row["strategy"] = strategy_label(cfg.get("strategy"))
            row["precision"] = precision_label(cfg.get("precision"))
            row["model"] = _get(cfg, "model.name")
            row["seq_len"] = pt.get("seq_len")
            row["batch_size"] = pt.get("batch_size")
            row["params"] = _get(rec, "model.params")
            row["model_state_bytes"] = _get(rec, "memory.model_state_bytes.predicted")
            row["act_bytes"] = _get(pt, "activation_bytes.predicted")
            row["korthikanti_bytes"] = _get(pt, "activation_bytes.korthikanti")
            row["peak_bytes"] = _get(pt, "peak_bytes.predicted")
            row["peak_phase"] = _get(pt, "peak_bytes.phase")
            row["target"] = rec.get("target")
            rows.append(row)
    if len({r.get("seq_len") for r in rows}) > 1 and "data.seq_len" not in axes:
        axes.append("data.seq_len")  # priced as a series inside one job
    return axes, rows


def _axis_value(row: dict, ax: str) -> Any:
    if ax == "strategy" or ax.startswith("strategy."):
        return row["strategy"]
    if ax.startswith("precision."):
        return row["precision"]
    if ax == "data.seq_len":
        return row["seq_len"]
    if ax == "model.name":
        return row["model"]
    return row.get(ax)


def table_axes(axes: list[str]) -> list[str]:
    """The columns that name a row: one per swept axis (a strategy's or precision's options
    collapse into its label)."""
    out: list[str] = []
    for ax in axes:
        name = (
            "strategy"
            if ax.startswith("strategy.")
            else "precision"
            if ax.startswith("precision.")
            else "model"
            if ax.startswith("model.")
            else "seq_len"
            if ax == "data.seq_len"
            else ax
        )
        if name not in out:
            out.append(name)
    return out or ["model", "strategy"]


def _cell(row: dict, col: str) -> Any:
    return {
        "strategy": row.get("strategy"),
        "precision": row.get("precision"),
        "model": row.get("model"),
        "seq_len": row.get("seq_len"),
    }.get(col, row.get(col))


def write_estimates(axes: list[str], rows: list[dict], out: Path, source: str) -> list[Path]:
    """estimates.csv, estimates.md, estimates.tex: the predictions across the swept axes."""
    from recompute_lab.analysis.tables import booktabs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = table_axes(axes)
    ok = [r for r in rows if not r.get("error")]
    ok.sort(key=lambda r: tuple(str(_cell(r, c)) for c in cols) + (r["run"],))
    paths = [out / "estimates.csv", out / "estimates.md", out / "estimates.tex"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*cols, "batch_size", *PREDICTIONS, "target", "run"])
    for r in ok:
        w.writerow(
            [
                "" if v is None else v
                for v in [
                    *(_cell(r, c) for c in cols),
                    r["batch_size"],
                    *(r[p] for p in PREDICTIONS),
                    r["target"],
                    r["run"],
                ]
            ]
        )
    paths[0].write_text(buf.getvalue())
    head = [*cols, "b", "params", "model state", "activations", "Korthikanti (16-bit)", "peak",
            "peak phase"]  # fmt: skip
    body = [
        [
            *(str(_cell(r, c)) for c in cols),
            str(r["batch_size"]),
            "n/a" if r["params"] is None else f"{r['params']:,}",
            fmt_bytes(r["model_state_bytes"]),
            fmt_bytes(r["act_bytes"]),
            fmt_bytes(r["korthikanti_bytes"]),
            fmt_bytes(r["peak_bytes"]),
            r["peak_phase"] or "n/a",
        ]
        for r in ok
    ]
    targets = sorted({str(r["target"]) for r in ok})
    intro = (
        f"{len(ok)} predictions from {len({r['run'] for r in ok})} estimate job(s) in "
        f"`{source}`, across {', '.join(cols)} (the axes that differ between jobs); target "
        f"device {', '.join(targets) or 'n/a'}. Predicted by recompute_lab.predict, nothing "
        "measured. Bytes in binary units; peak: one training step's largest phase."
    )
    lines = ["# Estimate sweep: predictions", "", intro, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in b) + " |" for b in body]
    bad = [r for r in rows if r.get("error")]
    if bad:
        lines += ["", "## Unreadable estimate.json", ""]
        lines += [f"- `{r['run']}`: {r['error']}" for r in bad]
    paths[1].write_text("\n".join(lines) + "\n")
    paths[2].write_text(
        booktabs(head, body, "l" * len(cols) + "rrrrrrl", intro.replace("`", ""), "tab:est", True)
    )
    return paths

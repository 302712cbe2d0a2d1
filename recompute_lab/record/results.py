"""The results.json contract (schema_version 1): the record every run leaves, and its one-screen
summary.

results.json is the source of truth of a run: written exactly once per run, successful or not,
atomically (a
temporary file in the same folder, then os.replace). W&B (recompute_lab.record.wandb_run) mirrors
it.

Layer: record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


from recompute_lab.record.fileio import atomic_write_text
from recompute_lab.measure.timing import describe

SCHEMA_VERSION = 1


def new_results(config: dict) -> dict:
    """A results record with every contract key present; measurements fill it in as they happen.
    ``config``: the
    run's resolved config as plain Python (RunSpec.to_dict)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "error",  # pessimistic until the run finishes
        "config": config,
        "env": {},
        "model": {},
        "strategy": {},
        "loss": {"first": None, "final": None, "history": []},
        "memory": {
            "model_state_bytes": {"predicted": None, "measured": None, "per_param": None},
            "activation_bytes": {"predicted": None, "measured": None, "by_module": {}},
            "peak_bytes": {"predicted": None, "measured": None, "source": None},
        },
        "flops": {
            "per_step": None,
            "predicted_per_step": None,
            "recompute_overhead": None,
            "mfu": None,
            "hfu": None,
        },
        "time": {
            "step_s_median": None,
            "step_s_p90": None,
            "tokens_per_s": None,
            "warmup_steps": None,
            "step_s": [],
        },
    }


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON can hold it: non-finite floats as "inf" / "-inf" (NaN as null), tensors as
    lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    torch_type = (
        type(obj).__module__.split(".")[0] == "torch"
    )  # duck-typed: the record layer imports no torch
    if torch_type and hasattr(obj, "tolist"):  # a tensor
        return jsonable(obj.tolist())
    if torch_type or isinstance(obj, Path):  # torch.dtype, torch.device
        return str(obj)
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so a reader never sees a half-written file (recompute_lab.record.fileio: temp
    file, fsync, rename)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False))


def _si(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "n/a"
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def format_summary(results: dict, path: Optional[Path] = None) -> str:
    """A few human-readable lines on what a run measured (printed at the end of every run)."""
    cfg, loss, t, fl = results["config"], results["loss"], results["time"], results["flops"]
    ms = results["memory"]["model_state_bytes"]
    lines = [
        f"recompute_lab: status {results['status']}  model={cfg['model']['name']} "
        f"precision={cfg['precision']['name']} strategy={cfg['strategy']['name']} "
        f"attention={cfg['model']['attention']} device={results['env'].get('device', '?')}"
    ]
    if loss["final"] is not None:
        speed = (
            f"{_si(t['tokens_per_s'])} tokens/s (median step {t['step_s_median'] * 1e3:.1f} ms)"
            if t.get("step_s_median") is not None
            else f"time n/a: {t.get('reason', 'no timed step')}"
        )
        lines.append(
            f"  loss {loss['first']:.4f} -> {loss['final']:.4f} over {len(loss['history'])} steps; "
            f"{speed}"
        )
        lp = t.get("loop") or {}
        if lp.get("iterations"):
            per = lambda key: f"{lp[key] / lp['iterations'] * 1e3:.2f} ms"
            probe = (  # the memory probe's counts on a training step (engine.LoopClock)
                f"; plus the memory probe's counts, {lp['probe_s']:.2f} s"
                if lp.get("probe_s")
                else ""
            )
            lines.append(
                f"  loop outside the step: {lp['outside_step']:.1%} of its time (per iteration: "
                f"data {per('data_s')}, logging {per('log_s')}, other {per('other_s')}){probe}"
            )
    ovh = t.get("overhead") or {}
    if ovh.get("baseline") is not None and (ovh.get("rounds") or ovh.get("skipped")):
        what = (
            f"skipped: {ovh['skipped']}"
            if ovh.get("skipped")
            else f"{describe(ovh['ratio'], ovh['ci95_low'], ovh['ci95_high'])}, {ovh['rounds']} "
            f"paired rounds"
        )
        lines.append(
            f"  step time vs {ovh['baseline']}: {what}"
            + (f" [contended: {t['contended_reason']}]" if t.get("contended") else "")
        )
    par = results.get("parallel") or {}
    if ms.get("measured") is not None:
        scope = (
            f" per rank of {par.get('world_size')} ({par.get('kind')})"
            if par.get("world_size", 1) > 1
            else ""
        )
        lines.append(
            f"  model state{scope} {_si(ms['measured'], 'B')} "
            f"({ms['bytes_per_param']['measured']:.1f} B/param, "
            f"predicted {ms['bytes_per_param']['predicted']})"
        )
    act, peak = (
        results["memory"].get("activation_bytes") or {},
        results["memory"].get("peak_bytes") or {},
    )
    if act.get("measured") is not None:
        lines.append(
            f"  activations saved for backward {_si(act['measured'], 'B')} "
            f"(predicted {_si(act.get('predicted'), 'B')}); "
            f"peak {_si(peak.get('measured'), 'B')} (predicted {peak_bound(peak)}"
            f"{_si(peak.get('predicted'), 'B')}, {peak.get('source') or 'n/a'})"
        )
    if fl.get("per_step"):
        ps = fl["per_step"]
        hfu = (
            "n/a" if fl.get("hfu") is None else f"{fl['hfu']:.1%}"
        )  # n/a: recompute not counted (inductor)
        mfu = f"  MFU {fl['mfu']:.1%} HFU {hfu}" if fl.get("mfu") is not None else ""
        over = "" if fl.get("recompute_overhead") is None else f" (+{fl['recompute_overhead']:.1%})"
        lines.append(
            f"  FLOPs/step {_si(ps['forward'] + ps['backward'])} + recompute {_si(ps['recompute'])}"
            f"{over}{mfu}"
        )
    if results.get("error"):
        lines.append(f"  error: {results['error']}")
    if path is not None:
        lines.append(f"  results: {path}")
    return "\n".join(lines)


def peak_bound(peak: dict) -> str:
    """'<= ' when the predicted peak is the recompute phase's, which recompute_lab.predict.peak
    computes as an upper bound
    (every gradient counted while a region recomputes, though most do not exist yet); '' when it is
    exact."""
    return "<= " if (peak.get("predicted_parts") or {}).get("phase") == "recompute" else ""

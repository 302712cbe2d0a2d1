"""The step-time model on this CPU: calibrated by microbenchmarks, then set beside the paired time
overheads the committed runs measured (their 95% intervals), strategy by strategy.

    python experiments/cpu_time_check.py --calibrate   # measure this CPU (one thread, as the runs)
    python experiments/cpu_time_check.py               # predict from the committed calibration

Calibration (experiments/figures/cpu_time_calibration.json), at the runs' thread count, per
shape the runs use (recompute_lab.measure.hardware.step_time_calibration; the same function
experiments/gpu_check.py calibrates a GPU with):
  bandwidth   recompute_lab.measure.hardware.measured_copy_bandwidth (bytes read + written)
  matmul      FLOP/s of a GEMM at each model's mlp.fc shape (b s x d x d_ff) in its dtype, best
              time less one kernel's overhead: the rate the model's GEMMs run at (small GEMMs on a
              CPU run far from a 1024^3 GEMM's rate, and bf16 GEMMs without a fast path far
              below fp32's)
  attention   the same for scaled_dot_product_attention (causal) at the model's (b, h, s, hd)
  overhead    seconds per kernel: a chain of K one-element multiplies with autograd, forward and
              backward, over its 3K kernels (one forward, two backward: the gradient product and
              its accumulation)
  region      seconds per checkpoint region beyond its op: the same chain with each multiply in
              a non-reentrant checkpoint (RNG state preserved), less the plain chain, per link
  mechanisms  seconds per op of op-SAC's policy mode and of torch_remat, per named torch_remat
              sub-region (recomputed or saved): chains of GELUs in one region each way
  dispatched  aten ops one block's forward dispatches (a count, by a dispatch mode)
Prediction: recompute_lab.predict.step_time on one device with the rates and efficiencies
step_time.calibrated makes of those measurements; the
overhead of a strategy is step(strategy) / step(none) - 1, for every committed run with a paired
measurement (experiments/figures/results.json.gz): every strategy is timed from the rerun ops of
its plan (layers and sqrt as 'none + n/L full', op-SAC and regions from their save lists, offload
from its saved bytes). The table
(experiments/figures/cpu_time_check.md) says whether each prediction falls inside the measured
interval; tests/unit/test_cpu_time_check.py recomputes it from the committed calibration.

Layer: experiments.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

from omegaconf import OmegaConf

from recompute_lab.config import LayoutConfig, ModelConfig
from recompute_lab.config.spec import as_model_config
from recompute_lab.config.strategies import label_of as config_label
from recompute_lab.predict import step_time as T

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "figures" / "results.json.gz"
CALIBRATION = HERE / "figures" / "cpu_time_calibration.json"
OUT = HERE / "figures" / "cpu_time_check.md"
ONE = OmegaConf.structured(LayoutConfig())  # one device


def label_of(strategy: dict) -> str:
    """The step-time model's label of a run's strategy config: the tables' label
    (recompute_lab.config.strategies.label_of: selective[modules], op(every_other_mm=True), ...)."""
    return config_label(strategy)


def timed_as(record: dict) -> str:
    """The label the step-time model times a run as: layers and sqrt checkpoint whole blocks, so
    they are 'none + n/L full' with n the blocks inside their regions (the record's plan). A region
    of several blocks is timed as that many one-block regions: it has fewer region overheads, and
    its early stop spares one mlp.proj per region rather than per block (both small, both named
    here, neither modelled)."""
    label = label_of(record["config"]["strategy"])
    groups = record["strategy"].get("regions")
    if record["config"]["strategy"].get("name") in ("layers", "sqrt") and groups:
        n = sum(len(g) for g in groups)
        return f"none + {n}/{record['config']['model']['n_layer']} full"
    return label


def model_of(cfg: dict) -> ModelConfig:
    m = {k: v for k, v in cfg["model"].items() if k != "hf"}
    return as_model_config(OmegaConf.merge(OmegaConf.structured(ModelConfig), m))


def runs() -> list[dict]:
    """Committed runs with a paired time overhead, and their baselines' step times."""
    bundle = json.loads(gzip.open(RESULTS).read())
    out = []
    for name, r in sorted(bundle.items()):
        o = r["time"]["overhead"]
        if o.get("ratio") is None or r["strategy"].get("name") == "none":
            continue
        out.append({"run": name.split("_+")[0], "record": r, "overhead": o})
    return out


def shape_key(cfg: dict) -> str:
    m, d = cfg["model"], cfg["data"]
    return (
        f"{m['name']} b{d['batch_size']} s{d['seq_len']} d{m['d_model']} ff{m['d_ff']} "
        f"h{m['n_head']} {cfg['precision']['name']}"
    )


def calibrate(threads: int = 1) -> dict:
    """Measure this CPU (module docstring) for every shape the committed runs use."""
    import torch

    from recompute_lab.measure.hardware import step_time_calibration

    torch.set_num_threads(threads)
    shapes = {}
    for r in runs():
        cfg = r["record"]["config"]
        key = shape_key(cfg)
        if key in shapes:
            continue
        m, d = cfg["model"], cfg["data"]
        dtype = torch.float32 if cfg["precision"]["name"] == "fp32" else torch.bfloat16
        tok = d["batch_size"] * d["seq_len"]
        hd = m["d_model"] // m["n_head"]
        shapes[key] = step_time_calibration(
            torch.device("cpu"),
            dtype,
            (tok, m["d_model"], m["d_ff"]),
            (d["batch_size"], m["n_head"], d["seq_len"], hd),
        )
        shapes[key]["dispatched_per_layer"] = dispatched_per_layer(cfg)
    return {
        "threads": threads,
        "shapes": shapes,
        "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def dispatched_per_layer(cfg: dict) -> int:
    """Aten ops one block's forward dispatches on this CPU (views included: op-SAC's policy mode
    and torch_remat's hooks see each), counted by a dispatch mode around the second block of the
    run's model (fp32 weights, the run's shape; a count, not a time)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from recompute_lab.model.gpt import build_model

    class Count(TorchDispatchMode):
        on, n = False, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += Count.on
            return func(*args, **(kwargs or {}))

    model = build_model(model_of(cfg), device="cpu", dtype=torch.float32).train()
    block = model.blocks[1]
    block.register_forward_pre_hook(lambda *_: setattr(Count, "on", True))
    block.register_forward_hook(lambda *_: setattr(Count, "on", False))
    d = cfg["data"]
    idx = torch.zeros(d["batch_size"], d["seq_len"], dtype=torch.long)
    with torch.no_grad(), Count():
        model(idx, idx)
    return Count.n


def predict(cal: dict) -> list[dict]:
    """Predicted beside measured overhead per committed run (module docstring)."""
    rows = []
    for r in runs():
        rec = r["record"]
        cfg = rec["config"]
        label, timed = label_of(rec["config"]["strategy"]), timed_as(rec)
        o = r["overhead"]
        row = {
            "run": r["run"],
            "strategy": label if timed == label else f"{label} (as {timed})",
            "precision": cfg["precision"]["name"],
            "attention": cfg["model"]["attention"],
            "seq": cfg["data"]["seq_len"],
            "measured": o["ratio"] - 1,
            "low": o["ci95_low"] - 1,
            "high": o["ci95_high"] - 1,
        }
        model = model_of(cfg)
        if T.n_full(timed) is None and T.recomputed_ops(timed, cfg=model) is None:
            rows.append({**row, "predicted": None, "note": "not timed by the model"})
            continue
        fp32 = cfg["precision"]["name"] == "fp32"
        shape = cal["shapes"][shape_key(cfg)]
        rates, eff = T.calibrated(shape, "this CPU")
        b, s = cfg["data"]["batch_size"], cfg["data"]["seq_len"]
        precision = "fp32" if fp32 else "bf16_master"
        n = shape.get("dispatched_per_layer")
        base = T.step_time(model, ONE, "none", b, s, rates, precision, eff, None, n)
        mine = T.step_time(model, ONE, timed, b, s, rates, precision, eff, None, n)
        pred = mine["step_s"] / base["step_s"] - 1
        rows.append(
            {**row, "predicted": pred, "inside": row["low"] <= pred <= row["high"], "note": ""}
        )
    return rows


def by_strategy(timed: list[dict]) -> dict[str, list[float]]:
    """Prediction errors grouped by strategy name (the label before its options)."""
    out: dict[str, list[float]] = {}
    for r in timed:
        name = r["strategy"].split("(")[0].split(" ")[0]
        out.setdefault(name, []).append(r["predicted"] - r["measured"])
    return out


def table(cal: dict, rows: list[dict]) -> str:
    timed = [r for r in rows if r["predicted"] is not None]
    inside = sum(r["inside"] for r in timed)
    errs = [r["predicted"] - r["measured"] for r in timed]
    worst = max(timed, key=lambda r: abs(r["predicted"] - r["measured"]))
    lines = [
        "# Step-time model on this CPU vs the committed paired time overheads",
        "",
        "Generated by `python experiments/cpu_time_check.py` from the calibration in "
        f"cpu_time_calibration.json (measured {cal['measured_at']}, {cal['threads']} thread, "
        f"torch {cal['torch']}: GEMM and attention rates, copy bandwidth, per-kernel, "
        "per-checkpoint-region, op-SAC and torch_remat costs at each shape, "
        "recompute_lab.measure.hardware."
        "step_time_calibration) and the runs in results.json.gz (tiny; their own paired, "
        "interleaved measurements with 95% intervals). bf16_autocast runs are timed as bf16 "
        "matmuls with 16-bit activations.",
        "",
        f"{len(timed)} strategies timed: {inside} predictions inside the measured interval; "
        f"median error {statistics.median(errs):+.1%} (predicted - measured overhead, in "
        f"points of the baseline's step), worst {worst['predicted'] - worst['measured']:+.1%} "
        f"({worst['run']}, {worst['strategy']}).",
        "",
        "Median error by strategy: "
        + ", ".join(
            f"{name} {statistics.median(e):+.1%}" for name, e in sorted(by_strategy(timed).items())
        )
        + ".",
        "",
        "| run | strategy | precision | attention | seq | measured overhead (95% CI) | predicted "
        "| inside |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pred = "-" if r["predicted"] is None else f"{r['predicted']:+.1%}"
        inside = r["note"] or ("yes" if r["inside"] else "no")
        lines.append(
            f"| {r['run']} | {r['strategy']} | {r['precision']} | {r['attention']} | {r['seq']} | "
            f"{r['measured']:+.1%} ({r['low']:+.1%} to {r['high']:+.1%}) | {pred} | {inside} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", action="store_true", help="measure this CPU first")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.calibrate:
        cal = calibrate()
        CALIBRATION.write_text(json.dumps(cal, indent=1, sort_keys=True) + "\n")
    cal = json.loads(CALIBRATION.read_text())
    text = table(cal, predict(cal))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""GPU check: gpt2_small in bf16_master under none, full, selective and op — the figures that need a
real GPU,
paired time overheads included.

To run (one GPU, a few minutes):  python experiments/gpu_check.py [--steps 20] [--out gpu_check.csv]
Reduced CPU mode (what the test suite runs so the script cannot rot):  python
experiments/gpu_check.py --reduced

Prints per strategy: tokens/s, MFU / HFU (datasheet peak of the GPU), peak allocated bytes from the
CUDA
allocator, the predicted peak next to it, and activation bytes measured vs predicted; then the
paired time
overheads of full / selective / op against none (each run's results.json time.overhead: after
training its step
and none's alternate in ABBA rounds on the same batches, timed with CUDA events; median ratio with a
95%
interval) beside their counted FLOP overheads. The tables are what the README's GPU section records,
with the
GPU's name.

Then the card's own figures that recompute_lab.predict.devices uses for headroom: the total torch
reports (``get_device_properties(0).total_memory``, beside the preset of that card, if any), the
memory the process holds outside the caching allocator after the runs (``mem_get_info``'s total
minus free, minus ``memory_reserved``: the CUDA context, kernel images, library workspaces), and per
strategy the allocator's overhead at the peak (``max_memory_reserved / max_memory_allocated - 1``,
the fragmentation reserve's fraction). Last, the step-time model (recompute_lab.predict.step_time)
calibrated on the device at the runs' shapes, its predicted step and overhead per strategy beside
the measured ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import get, print_table, run_overrides, time_columns, write_csv  # noqa: E402

STRATEGIES = ["none", "full", "selective", "op"]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument(
        "--max-rounds", type=int, default=20, help="cap on each run's paired overhead rounds"
    )
    ap.add_argument(
        "--reduced",
        action="store_true",
        help="tiny model on CPU, 3 steps: a smoke test of this script",
    )
    ap.add_argument("--out", default=None, help="CSV path")
    args = ap.parse_args(argv)
    if args.reduced:
        base = [
            "model=tiny",
            # the smallest shapes the tables still order (a smoke test: its 4 runs' paired
            # rounds are most of its time)
            "data.batch_size=2",
            "data.seq_len=32",
            "trainer.steps=3",
            "trainer.warmup_steps=1",
            "trainer.device=cpu",
            "trainer.overhead.max_rounds=6",
        ]
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check needs CUDA (use --reduced for the CPU smoke test)")
        base = [
            "model=gpt2_small",
            f"data.seq_len={args.seq_len}",
            f"data.batch_size={args.batch_size}",
            f"trainer.steps={args.steps}",
            "trainer.warmup_steps=5",
            "trainer.device=cuda",
            f"trainer.overhead.max_rounds={args.max_rounds}",
        ]
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available() and not args.reduced
        else "cpu (reduced)"
    )
    rows, records = [], []
    t0 = time.time()
    cuda = torch.cuda.is_available() and not args.reduced
    for name in STRATEGIES:
        if cuda:
            torch.cuda.empty_cache()  # each run's reserved-over-allocated starts from an empty pool
            torch.cuda.reset_peak_memory_stats()
        res = run_overrides([*base, "precision=bf16_master", f"+strategy={name}"])
        records.append(res)
        frag = None
        if cuda and torch.cuda.max_memory_allocated() > 0:
            frag = torch.cuda.max_memory_reserved() / torch.cuda.max_memory_allocated() - 1
        rows.append(
            {
                "device": device,
                "strategy": name,
                "status": res["status"],
                "tokens_per_s": get(res, "time.tokens_per_s"),
                "mfu": get(res, "flops.mfu"),
                "hfu": get(res, "flops.hfu"),
                "recompute_overhead": get(res, "flops.recompute_overhead"),
                "peak_measured": get(res, "memory.peak_bytes.measured"),
                "peak_predicted": get(res, "memory.peak_bytes.predicted"),
                "peak_source": get(res, "memory.peak_bytes.source"),
                "act_measured": get(res, "memory.activation_bytes.measured"),
                "act_predicted": get(res, "memory.activation_bytes.predicted"),
                "fragmentation": frag,
                **time_columns(get(res, "time.overhead", {})),
            }
        )
    print(f"gpu_check on {device}, torch {torch.__version__}, {time.time() - t0:.0f} s")
    print_table(
        rows,
        [
            ("strategy", "strategy", "s"),
            ("status", "status", "s"),
            ("tokens_per_s", "tok/s", ",.0f"),
            ("mfu", "MFU", ".3f"),
            ("hfu", "HFU", ".3f"),
            ("recompute_overhead", "FLOP ovh", ".3f"),
            ("peak_measured", "peak meas B", ",.0f"),
            ("peak_predicted", "peak pred B", ",.0f"),
            ("act_measured", "act meas B", ",.0f"),
            ("act_predicted", "act pred B", ",.0f"),
        ],
    )
    print(f"paired time overhead vs none (in-run, ABBA rounds, 95% CI), {device}:")
    print_table(
        [r for r in rows if r["strategy"] != "none"],
        [
            ("strategy", "strategy", "s"),
            ("recompute_overhead", "FLOP ovh", ".3f"),
            ("time_overhead", "time/none", ".3f"),
            ("time_ci95_low", "ci low", ".3f"),
            ("time_ci95_high", "ci high", ".3f"),
            ("time_rounds", "rounds", "d"),
            ("time_words", "time overhead", "s"),
        ],
    )
    if cuda:
        card_table(rows)
    for row, pred in zip(rows, time_table(records, cuda)):
        row.update(pred)
    write_csv(rows, args.out)
    return rows


def time_table(records: list[dict], cuda: bool) -> list[dict]:
    """The step-time model calibrated on this device (recompute_lab.measure.hardware.
    step_time_calibration at the runs' GEMM and attention shapes) beside each run's measured
    median step and paired overhead: what recompute_lab.predict.step_time predicts where it
    can be checked."""
    from recompute_lab.config import LayoutConfig
    from recompute_lab.config.spec import RunSpec
    from recompute_lab.config.strategies import label_of
    from recompute_lab.measure.hardware import step_time_calibration
    from recompute_lab.predict import step_time as T

    spec = RunSpec.of(records[0]["config"])
    m, b, s = spec.model, spec.data.batch_size, spec.data.seq_len
    device = torch.device("cuda" if cuda else "cpu")
    cal = step_time_calibration(
        device,
        torch.bfloat16,
        (b * s, m.d_model, m.d_ff),
        (b, m.n_head, s, m.d_model // m.n_head),
    )
    rates, eff = T.calibrated(cal, device.type)
    one = LayoutConfig()
    base = T.step_time(m, one, "none", b, s, rates, "bf16_master", eff)["step_s"]
    out = []
    for res in records:
        label = label_of(res["config"]["strategy"])
        pred = None
        if T.recomputed_ops(label, cfg=m) is not None or T.n_full(label) is not None:
            pred = T.step_time(m, one, label, b, s, rates, "bf16_master", eff)["step_s"]
        out.append(
            {
                "step_measured_s": get(res, "time.step_s_median"),
                "step_predicted_s": pred,
                "overhead_predicted": None if pred is None else pred / base,
            }
        )
    print(
        f"step time, measured vs predicted (recompute_lab.predict.step_time calibrated here: "
        f"GEMM {cal['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s, attention "
        f"{cal['attention_flops_per_s'] / 1e12:.2f} TFLOP/s, copy "
        f"{cal['copy_bytes_per_s'] / 1e9:.0f} GB/s, {cal['op_overhead_s'] * 1e6:.1f} us per "
        f"kernel, {cal['region_overhead_s'] * 1e6:.1f} us per checkpoint region):"
    )
    print_table(
        [
            {
                **r,
                "strategy": res["config"]["strategy"]["name"],
                "time_overhead": get(res, "time.overhead.ratio"),
            }
            for r, res in zip(out, records)
        ],
        [
            ("strategy", "strategy", "s"),
            ("step_measured_s", "step meas s", ".4f"),
            ("step_predicted_s", "step pred s", ".4f"),
            ("time_overhead", "ovh meas", ".3f"),
            ("overhead_predicted", "ovh pred", ".3f"),
        ],
    )
    return out


def card_table(rows: list[dict]) -> None:
    """The card's total, the memory held outside the allocator, and the allocator's overhead at each
    run's peak: the figures behind recompute_lab.predict.devices' presets and reserve."""
    from recompute_lab.predict import devices

    total = torch.cuda.get_device_properties(0).total_memory
    free, whole = torch.cuda.mem_get_info()
    outside = whole - free - torch.cuda.memory_reserved()
    name = torch.cuda.get_device_name(0)
    preset = next((c for c in devices.CARDS.values() if c.name.split("_")[0] in name.lower()), None)
    print(f"card: {name}: total_memory {total:,} B ({total / devices.GiB:.2f} GiB)")
    if preset is not None:
        print(f"  preset {preset.name}: {preset.total_bytes:,} B ({preset.total_gib:.2f} GiB)")
    print(
        f"  held outside the caching allocator (CUDA context, kernels, workspaces): {outside:,} B "
        f"({outside / devices.GiB:.2f} GiB; reserve default {devices.CONTEXT_GIB} GiB)"
    )
    for r in rows:
        if r.get("fragmentation") is not None:
            print(
                f"  {r['strategy']}: max reserved / max allocated - 1 = {r['fragmentation']:.3f} "
                f"(reserve default {devices.FRAGMENTATION})"
            )


if __name__ == "__main__":
    main()

"""The advisor: every layout x strategy x micro-batch for a cluster and a global batch, ranked by
predicted tokens/s among those that fit, with the winner exported for the tools that run it.

Layer: predict (no torch). Memory is recompute_lab.predict.per_gpu's per-rank peak (the busiest
pipeline rank, against the card after its reserve: recompute_lab.predict.devices); time is
recompute_lab.predict.step_time's. Candidates: tp in {1, 2, 4, 8} (within a node, SP on), cp in
{1, 2, 4, 8} (flash attention only), pp a power of two up to ``max_pp`` (1F1B), the rest FSDP
(dp_shard); a micro-batch b gives m = global_batch / (dp_shard x b) micro-batches (pp > 1 needs
m >= pp; with pp = 1 they are gradient-accumulation steps). Per candidate: the strategies asked
for, and the per-stage plan (per_gpu.plan_stages: none or selective on most layers, full on n per
stage) when it differs from them.

Exports: our own estimate command (Hydra overrides), a torchtitan TOML fragment ([parallelism] and
[training]: the field names of torchtitan 0.3's ParallelismConfig and TrainingConfig; its
activation checkpointing is a policy class chosen in Python, named in a comment) and Megatron-LM
arguments (--tensor-model-parallel-size ... --recompute-granularity,
--recompute-method block --recompute-num-layers n for a per-stage 'n/L full' plan, which is
Megatron's own rule: the first n layers of each stage).
"""

from __future__ import annotations

from typing import Optional

from recompute_lab.config import ConfigError, LayoutConfig
from recompute_lab.predict import devices, per_gpu, step_time
from recompute_lab.predict import layout as L

GiB = devices.GiB


def layouts(cfg, gpus: int, seq: int, max_pp: int, per_node: int):
    """Every (tp, cp, pp, dp_shard) over ``gpus`` that the model's shapes allow."""
    pows = [1, 2, 4, 8, 16, 32, 64]
    for tp in (t for t in pows if t <= min(8, per_node)):
        for cp in (c for c in pows if c <= 8):
            if cp > 1 and str(cfg.attention) != "sdpa":
                continue
            for pp in (p for p in pows if p <= min(max_pp, cfg.n_layer)):
                if gpus % (tp * cp * pp):
                    continue
                yield tp, cp, pp, gpus // (tp * cp * pp)


def candidates(cfg, gpus: int, seq: int, global_batch: int, micro: list, max_pp: int, card: str):
    """(LayoutConfig, micro-batch) pairs that are valid for ``cfg`` at ``seq``."""
    per_node = step_time.rates_of(card).gpus_per_node
    for tp, cp, pp, ds in layouts(cfg, gpus, seq, max_pp, per_node):
        for b in micro:
            if global_batch % (ds * b):
                continue
            m = global_batch // (ds * b)
            if pp > 1 and m < pp:
                continue
            lay = LayoutConfig(
                tp=tp, sp=tp > 1, pp=pp, cp=cp, dp_shard=ds, microbatches=m, gpu=card
            )
            try:
                L.validate_layout(lay, cfg, seq)
            except ConfigError:
                continue
            yield lay, b


def advise(
    cfg,
    seq: int,
    gpus: int,
    card: str,
    global_batch: Optional[int] = None,
    micro_batches=(1, 2, 4, 8),
    strategies=("none", "selective", "full"),
    max_pp: int = 16,
    precision: str = "bf16_master",
) -> dict:
    """Rank every candidate (module docstring) by predicted tokens/s, those that fit first."""
    device = devices.device_of(LayoutConfig(gpu=card))
    rates = step_time.rates_of(card)
    gb = int(global_batch) if global_batch is not None else gpus
    for s in strategies:
        if s not in per_gpu.STRATEGIES:
            raise ConfigError(
                f"plan.strategies: {s!r} is not one the advisor times; valid: "
                f"{', '.join(per_gpu.STRATEGIES)}"
            )
    out = []
    for lay, b in candidates(cfg, gpus, seq, gb, list(micro_batches), max_pp, card):
        groups = devices.communicators(lay)
        budget = device.budget(groups)
        seen = set()
        for name in strategies:
            rows = per_gpu.stage_bytes(cfg, lay, name, b, seq, precision)
            out.append(_rank_row(cfg, lay, b, seq, name, rows, precision, device, rates))
            seen.add(name)
        plan = per_gpu.plan_stages(cfg, lay, budget, b, seq, precision)
        labels = plan["strategies"]
        if plan["fits"] and not (len(set(labels)) == 1 and labels[0] in seen):
            out.append(
                _rank_row(cfg, lay, b, seq, labels, plan["stages"], precision, device, rates)
            )
    out.sort(key=lambda r: (not r["fits"], -r["tokens_per_s"]))
    return {
        "gpus": gpus,
        "card": card,
        "seq_len": seq,
        "global_batch": gb,
        "precision": precision,
        "rows": out,
        "candidates": len(out),
    }


def _rank_row(cfg, lay, b, seq, label, rows, precision, device, rates) -> dict:
    groups = devices.communicators(lay)
    busiest = max(rows, key=lambda r: r["total"])
    fit = device.fit(busiest["total"], groups)
    t = step_time.step_time(cfg, lay, label, b, seq, rates, precision)
    uniform = not isinstance(label, list) or len(set(label)) == 1
    name = (label if not isinstance(label, list) else label[0]) if uniform else ", ".join(label)
    return {
        "layout": {
            k: getattr(lay, k) for k in ("tp", "sp", "pp", "cp", "dp_shard", "microbatches")
        },
        "micro_batch": b,
        "strategy": name,
        "stages": label if isinstance(label, list) else [label] * int(lay.pp),
        "peak_bytes": busiest["total"],
        "phase": busiest["phase"],
        "margin_bytes": fit["margin_bytes"],
        "fits": fit["fits"],
        "step_s": t["step_s"],
        "tokens_per_s": t["tokens_per_s"],
        "tokens_per_s_per_gpu": t["tokens_per_s"] / L.n_gpus(lay),
        "mfu": t["mfu"],
        "hfu": t["hfu"],
        "breakdown": t["breakdown"],
        "comm": t["comm"],
    }


def full_layers(label: str) -> Optional[int]:
    """n of a 'base + n/L full' label (None otherwise)."""
    mixed = step_time.n_full(label)
    return None if mixed is None else mixed[1]


def export(row: dict, model: str, seq: int, global_batch: int, precision: str, card: str) -> dict:
    """The winner as our estimate command, a torchtitan TOML fragment and Megatron-LM arguments."""
    lay, b = row["layout"], row["micro_batch"]
    stages = row["stages"]
    base = stages[0].split(" + ")[0]
    per_stage = [full_layers(s) or (0 if s in ("none", "selective") else None) for s in stages]
    whole = len(set(stages)) == 1 and full_layers(stages[0]) is None
    ours = [
        f"model={model}",
        f"data.seq_len={seq}",
        f"data.batch_size={b}",
        f"precision={precision}",
        *(f"estimate.layout.{k}={lay[k]}" for k in ("tp", "pp", "cp", "dp_shard")),
        f"estimate.layout.microbatches={lay['microbatches']}",
        f"estimate.layout.gpu={card}",
        f"+strategy={stages[0] if whole else base}",
    ]
    strategy = stages[0] if whole else base
    # torchtitan 0.3 picks activation checkpointing by policy class in the trainer's Python config
    # (a tyro subcommand), not in TOML; its SelectiveAC is per-op SAC (our `op`), not ours
    ac = {
        "none": "activation_checkpoint=None (tyro subcommand: none)",
        "full": "activation_checkpoint=FullAC.Config() (tyro subcommand: full)",
        "selective": "no torchtitan policy recomputes the attention core alone (its SelectiveAC "
        "is per-op SAC, our +strategy=op)",
    }[strategy]
    dp = lay["dp_shard"]
    titan = "\n".join(
        [
            "[parallelism]",
            "data_parallel_replicate_degree = 1",
            f"data_parallel_shard_degree = {dp}",
            f"tensor_parallel_degree = {lay['tp']}",
            f"enable_sequence_parallel = {'true' if lay['sp'] else 'false'}",
            f"context_parallel_degree = {lay['cp']}",
            f"pipeline_parallel_degree = {lay['pp']}",
            'pipeline_parallel_schedule = "1F1B"',
            f"pipeline_parallel_microbatch_size = {b}",
            "",
            "[training]",
            # with pp the local batch is split into micro-batches; without, the global batch
            # makes the gradient-accumulation steps
            f"local_batch_size = {b * lay['microbatches'] if lay['pp'] > 1 else b}",
            f"global_batch_size = {global_batch}",
            f"seq_len = {seq}",
            "",
            f"# activation checkpointing: {ac}",
        ]
    )
    megatron = [
        f"--tensor-model-parallel-size {lay['tp']}",
        f"--pipeline-model-parallel-size {lay['pp']}",
        f"--context-parallel-size {lay['cp']}",
        *(["--sequence-parallel"] if lay["sp"] and lay["tp"] > 1 else []),
        f"--micro-batch-size {b}",
        f"--global-batch-size {global_batch}",
        f"--seq-length {seq}",
    ]
    notes = []
    if dp > 1 and lay["pp"] == 1:
        megatron.append("--use-torch-fsdp2")
    elif dp > 1:  # Megatron's FSDP2 does not run with pipeline parallelism
        megatron.append("--use-distributed-optimizer")
        notes.append(
            "Megatron-LM: --use-torch-fsdp2 does not run with pipeline parallelism; the "
            "distributed optimizer shards only the optimizer state, so its memory is above this "
            "plan's (FSDP shards parameters and gradients too)"
        )
    if not whole:
        n = [x for x in per_stage if x]
        if base == "none" and n and len(set(n)) == 1:
            megatron += [
                "--recompute-granularity full",
                "--recompute-method block",
                f"--recompute-num-layers {n[0]}",
            ]
        else:
            notes.append(
                f"per-stage plan {stages}: Megatron's --recompute-num-layers is one n for every "
                "stage and torchtitan has no per-layer mix; the exports use the base strategy"
            )
    elif strategy != "none":
        megatron.append(f"--recompute-granularity {strategy}")
        if strategy == "full":
            megatron.append("--recompute-method uniform --recompute-num-layers 1")
    return {
        "recompute_lab": "python -m recompute_lab.estimate " + " ".join(ours),
        "torchtitan_toml": titan,
        "megatron_args": " ".join(a for a in megatron if a),
        "notes": notes,
    }


gib = per_gpu._gib  # GiB with two decimals, as estimate's per-GPU table prints them


def format_rows(res: dict, top: int) -> list[str]:
    """The ranked table (the first ``top`` rows)."""
    lines = [
        f"{res['candidates']} candidates for {res['gpus']} x {res['card']}, s={res['seq_len']}, "
        f"global batch {res['global_batch']} sequences, {res['precision']}; ranked by predicted "
        "tokens/s, fitting first (GiB = 2^30 B)",
        f"{'#':>3} {'tp':>2} {'sp':>2} {'pp':>2} {'cp':>2} {'dp':>3} {'m':>3} {'b':>2}  "
        f"{'strategy':<28}{'peak':>7}{'margin':>8}  {'tok/s/GPU':>10}{'MFU':>6}{'HFU':>6}"
        f"{'step s':>8}  fits",
    ]
    for i, r in enumerate(res["rows"][:top], 1):
        lay = r["layout"]
        lines.append(
            f"{i:>3} {lay['tp']:>2} {'y' if lay['sp'] and lay['tp'] > 1 else '-':>2} "
            f"{lay['pp']:>2} {lay['cp']:>2} {lay['dp_shard']:>3} {lay['microbatches']:>3} "
            f"{r['micro_batch']:>2}  {r['strategy'][:27]:<28}{gib(r['peak_bytes']):>7}"
            f"{gib(r['margin_bytes']):>8}  {r['tokens_per_s_per_gpu']:>10,.0f}"
            f"{r['mfu']:>6.1%}{r['hfu']:>6.1%}{r['step_s']:>8.3f}  "
            f"{'yes' if r['fits'] else 'no'}"
        )
    return lines


def explain(row: dict) -> list[str]:
    """One row's breakdown: where the step's time goes and its communication."""
    lines = [
        f"  step {row['step_s']:.4f} s = "
        + " + ".join(f"{k} {v:.4f}" for k, v in row["breakdown"].items())
    ]
    lines.append(
        "  communication (s): " + ", ".join(f"{k} {v:.4f}" for k, v in row["comm"].items())
    )
    lines.append(f"  per-stage strategies: {row['stages']}")
    lines.append(
        f"  busiest rank peak {gib(row['peak_bytes'])} GiB ({row['phase']}), margin "
        f"{gib(row['margin_bytes'])} GiB"
    )
    return lines

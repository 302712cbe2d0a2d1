"""Per-GPU bytes of one training step under a parallel layout, and the per-stage recomputation
planner.

For each pipeline stage (its rank 0 in tp, cp and data parallelism), :func:`stage_bytes` adds up:

  model state     recompute_lab.predict.layout.model_state_per_rank (TP shards, then FSDP's padded
                  dim-0 shards)
  activations     one micro-batch's saved bytes per rank (recompute_lab.measure.tensor_parallel's
                  per-rank theory, which
                  tests pin to PyTorch's sharding on the meta device) times what the schedule keeps
                  in flight:
                  1F1B min(p - rank, m) micro-batches; interleaved: PyTorch's own action list, chunk
                  by chunk
  transient       the largest of: a checkpoint region's re-saved tensors while it recomputes; on the
                  last
                  stage the fp32 gradients of the log-probabilities and logits (2 x 4sbv / t,
                  vocab-parallel)
  buffers         one RoPE table shared by all layers (fp32 cos + sin, S x hd / 2 each); with FSDP
                  the gathered
                  bf16 parameters of two blocks (this one and the prefetched next), tp-local

Context parallelism is analytic: each cp rank holds s / cp tokens of every per-token tensor, and
with the
flash / efficient SDPA kernels (the CUDA target) attention saves only local q, k, v, output and
log-sum-exp
(ring attention exchanges K/V chunks and recomputes with them in backward). PyTorch's
context_parallel
(torch.distributed.tensor.experimental) was not run on meta here: it dispatches SDPA to
ring-attention kernels
a fake process group does not exercise. Eager attention's s^2 scores are refused under cp > 1.

:func:`plan_stages` picks, per stage, the fewest recompute FLOPs whose total fits the device: none
or selective on
most layers and full recomputation on n of them (n chosen per stage; interleaved schedules: whole
strategies).
It is not the single-device budget planner's per-module solve.

Layer: predict (no torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

from recompute_lab.predict import layout as L
from recompute_lab.config.spec import RunSpec, Shape, as_model_config, to_plain
from recompute_lab.predict import theory
from recompute_lab.config import ConfigError
from recompute_lab.predict.peak import param_tensors

STRATEGIES = ("none", "selective", "full")  # ascending recompute cost
KINDS = ("model_state", "activations", "transient", "buffers")


def plan_of(name: str, n_layer: int):
    """A recompute_lab.strategies.Plan for the three fixed strategies, without building a model."""
    from recompute_lab.config.plan import Plan

    if name == "none":
        return None
    if name == "selective":
        return Plan(
            "selective",
            "attention core recomputed",
            recomputed=[f"blocks.{i}.attn.core" for i in range(n_layer)],
        )
    if name == "full":
        return Plan(
            "full", "each block recomputed", recomputed=[f"blocks.{i}" for i in range(n_layer)]
        )
    raise ConfigError(f"per-GPU planning knows strategies {', '.join(STRATEGIES)}, not {name!r}")


_MICRO: dict = {}  # (model fields, tp, sp, strategy, b, s, dtype, target) -> micro_batch's dict


def micro_batch(
    cfg,
    tp: int,
    sp: bool,
    strategy: str,
    b: int,
    s_local: int,
    param_bytes: int = 2,
    target: str = "cuda",
) -> dict:
    """One micro-batch on one rank: bytes per inner block, embeddings, final norm + head + loss, the
    largest
    checkpoint region, the loss's backward buffers. From a two-block copy of ``cfg`` (block 1 stands
    for every
    block after the first), cached: the what-fits grid asks for the same shapes many times."""
    from recompute_lab.predict.tp_theory import predict_rank

    cfg = as_model_config(cfg)
    fields = {k: v for k, v in to_plain(cfg).items() if k != "hf"}
    key = (json.dumps(fields, sort_keys=True), tp, sp, strategy, b, s_local, param_bytes, target)
    if key not in _MICRO:
        two = dataclasses.replace(cfg, n_layer=2)
        st = Shape(
            b, s_local, precision="bf16_master" if param_bytes == 2 else "fp32", device=target
        )
        pred = predict_rank(two, st, tp, sp, plan_of(strategy, 2))
        if pred["total"] is None:
            raise ConfigError(f"no closed form for {strategy} on this model: {pred['reason']}")
        by = pred["by_module"]
        logits = s_local * b * cfg.vocab_size * 4 // tp  # fp32, vocab-parallel
        _MICRO[key] = {
            "layer": theory.per_layer(pred, 1),
            "first": sum(v for k, v in by.items() if k in ("tok_emb", "pos_emb", "drop")),
            "last": sum(v for k, v in by.items() if k in ("norm_f", "head", "loss")),
            "region": pred["largest_region"],
            "loss_backward": 2 * logits,
        }
    return _MICRO[key]


def stage_bytes(
    cfg,
    lay,
    strategy: str,
    batch: int,
    seq: int,
    precision: str = "bf16_master",
    target: str = "cuda",
    stages: Optional[list] = None,
) -> list[dict]:
    """Per pipeline rank: bytes by kind (:data:`KINDS`) and their total, for ``strategy`` on every
    stage (or
    ``stages[r]`` on rank r)."""
    tp, pp, cp, v = int(lay.tp), int(lay.pp), int(lay.cp), int(lay.pp_virtual)
    if cp > 1 and str(cfg.attention) == "eager":
        raise ConfigError(
            "estimate.layout.cp > 1 needs model.attention=sdpa: eager attention's s^2 scores are "
            "not modelled under context parallelism"
        )
    sp = bool(lay.sp) and tp > 1
    m, sched = L.microbatches(lay), str(lay.pp_schedule)
    counts = L.stage_layers(cfg.n_layer, pp, v)
    n_chunks = len(counts)
    pbytes = 2 if precision == "bf16_master" else 4
    hd = cfg.d_model // cfg.n_head
    rope = 2 * seq * hd // 2 * 4 if str(cfg.positions) == "rope" else 0
    block = [p for p in param_tensors(cfg, n_layer=1) if p.name.startswith("blocks.")]
    gathered = (
        2 * sum(math.prod(L.tp_local_shape(p, tp)) for p in block) * 2
        if int(lay.dp_shard) > 1
        else 0
    )
    out = []
    for rank in range(pp):
        strat = stages[rank] if stages else strategy
        mb = micro_batch(cfg, tp, sp, strat, batch, seq // cp, pbytes, target)

        # one micro-batch of each stage chunk k (only this rank's chunks k = rank, rank + pp, ...
        # matter here)
        chunk = [
            counts[k] * mb["layer"]
            + (mb["first"] if k == 0 else 0)
            + (mb["last"] if k == n_chunks - 1 else 0)
            for k in range(n_chunks)
        ]
        if sched == "1f1b":
            act = L.in_flight_chunks("1f1b", pp, m, rank) * chunk[rank]
        else:
            act = L.schedule_in_flight("interleaved", pp, m, v, chunk)[rank]
        holds_last = (n_chunks - 1) % pp == rank
        state = L.model_state_per_rank(cfg, lay, precision, stage=rank)
        kinds = {
            "model_state": state["total"],
            "activations": act,
            "transient": max(mb["region"], mb["loss_backward"] if holds_last else 0),
            "buffers": rope + gathered,
        }
        out.append(
            {
                "rank": rank,
                "strategy": strat,
                "layers": sum(counts[k] for k in range(rank, n_chunks, pp)),
                "in_flight": (L.in_flight_chunks(sched, pp, m, rank, v)),
                **kinds,
                "total": sum(kinds.values()),
            }
        )
    return out


def layer_recompute_flops(cfg, strategy: str, b: int, seq: int, tp: int, cp: int) -> int:
    """FLOPs one layer reruns in backward for one micro-batch on one rank
    (recompute_lab.measure.flops' rules: ``full``
    reruns the block but its last linear, ``selective`` the attention core's QK^T), split over tp;
    under cp each
    rank's s / cp queries meet all s keys."""
    if strategy == "none":
        return 0
    from recompute_lab.predict import flops

    model = RunSpec(model=as_model_config(cfg))
    parts = flops.module_forward_flops(model, b, seq // cp)
    extra = parts["attn.core"] * (cp - 1)  # 4 b (s/cp) s d, not 4 b (s/cp)^2 d
    for k in ("attn.core", "attn", "block"):
        parts[k] += extra
    return flops.recompute_flops(model, parts, "block" if strategy == "full" else "attn.core") // tp


def plan_stages(
    cfg,
    lay,
    device_bytes: int,
    batch: int,
    seq: int,
    precision: str = "bf16_master",
    target: str = "cuda",
) -> dict:
    """Per stage, the plan with the fewest recompute FLOPs whose per-GPU total fits ``device_bytes``
    (ties: fewer
    bytes): a base strategy (none or selective) on the stage's layers but n, full recomputation on n
    of them
    (Megatron's --recompute-num-layers, chosen per stage: early 1F1B stages keep more micro-batches
    in flight).
    Interleaved schedules (a rank holds several chunks) choose per stage among the three whole
    strategies only.
    A stage where nothing fits gets None. Returns {"stages": [...], "strategies": [labels], "fits":
    bool}."""
    tp, cp, v, pp = int(lay.tp), int(lay.cp), int(lay.pp_virtual), int(lay.pp)
    sp = bool(lay.sp) and tp > 1
    pbytes = 2 if precision == "bf16_master" else 4
    m = L.microbatches(lay)
    rows = {st: stage_bytes(cfg, lay, st, batch, seq, precision, target) for st in STRATEGIES}
    layer = {
        st: micro_batch(cfg, tp, sp, st, batch, seq // cp, pbytes, target)["layer"]
        for st in STRATEGIES
    }
    cost = {st: layer_recompute_flops(cfg, st, batch, seq, tp, cp) for st in STRATEGIES}
    chosen: list = []
    out: list = []
    for rank in range(pp):
        best = None
        for base in ("none", "selective"):
            row = rows[base][rank]
            n_layers = row["layers"]
            for n in range(n_layers + 1) if v == 1 else (0, n_layers):
                if (
                    n == n_layers
                ):  # every layer recomputed: the full row itself (base does not matter)
                    cand = dict(rows["full"][rank], strategy="full")
                else:
                    act = row["activations"] + row["in_flight"] * n * (layer["full"] - layer[base])
                    transient = max(row["transient"], rows["full"][rank]["transient"] if n else 0)
                    kinds = {
                        "model_state": row["model_state"],
                        "activations": act,
                        "transient": transient,
                        "buffers": row["buffers"],
                    }
                    cand = {
                        **row,
                        **kinds,
                        "total": sum(kinds.values()),
                        "strategy": base if n == 0 else f"{base} + {n}/{n_layers} full",
                    }
                cand.update(
                    full_layers=n,
                    recompute_flops=m * (n * cost["full"] + (n_layers - n) * cost[base]),
                )
                key = (cand["total"] > device_bytes, cand["recompute_flops"], cand["total"])
                if best is None or key < best[0]:
                    best = (key, cand)
        fits = not best[0][0]
        chosen.append(best[1]["strategy"] if fits else None)
        out.append(best[1] if fits else {**rows["full"][rank], "strategy": None})
    return {"stages": out, "strategies": chosen, "fits": all(c is not None for c in chosen)}


def layout_estimate(
    cfg, lay, strategy: str, batch: int, seq: int, precision: str, target: str, measure=None
) -> dict:
    """estimate's per-GPU section: one micro-batch measured on meta (``measure``: the caller's
    recompute_lab.measure.tensor_parallel.measure_micro_batch, so this layer imports no torch)
    beside the per-rank
    theory, every pipeline rank's bytes by kind, and (estimate.layout.device_gb set) the per-stage
    plan."""
    L.validate_layout(lay, cfg, seq)
    tp, cp = int(lay.tp), int(lay.cp)
    sp = bool(lay.sp) and tp > 1
    pbytes = 2 if precision == "bf16_master" else 4
    if precision == "bf16_autocast":
        raise ConfigError(
            "estimate.layout: bf16_autocast has no meta backend; use precision=bf16_master or fp32"
        )
    if measure is None:
        raise ConfigError(
            "layout_estimate needs the meta measurement (recompute_lab.measure.tensor_parallel."
            "measure_micro_batch) beside its theory"
        )
    measured = measure(cfg, tp, sp, strategy, batch, seq // cp, pbytes, target)
    predicted = micro_batch(cfg, tp, sp, strategy, batch, seq // cp, pbytes, target)
    out = {
        "layout": {k: (str(v) if k == "pp_schedule" else v) for k, v in lay.items()},
        "gpus": L.n_gpus(lay),
        "micro_batch": {"measured": measured, "predicted": predicted},
        "stages": stage_bytes(cfg, lay, strategy, batch, seq, precision, target),
        "korthikanti_layer": L.korthikanti_tp_layer_bytes(
            seq // cp, batch, cfg.d_model, cfg.n_head, tp, sp, strategy
        ),
    }
    if lay.device_gb is not None:
        out["plan"] = plan_stages(cfg, lay, int(lay.device_gb * 1e9), batch, seq, precision, target)
    return out


def format_layout(rep: dict) -> list[str]:
    """estimate's table lines for the layout section (GB = 1e9 B)."""
    lay, mb = rep["layout"], rep["micro_batch"]
    lines = [
        f"per GPU under tp={lay['tp']} (sp={lay['sp']}) pp={lay['pp']} ({lay['pp_schedule']}, "
        f"v={lay['pp_virtual']}, m={lay['microbatches'] or lay['pp']}) cp={lay['cp']} "
        f"dp_shard={lay['dp_shard']} "
        f"dp_replicate={lay['dp_replicate']}: {rep['gpus']} GPUs",
        "  one micro-batch per rank, GB   measured (meta, PyTorch TP)   theory   Korthikanti/layer "
        "(eager s^2)",
    ]
    for k in ("layer", "first", "last"):
        kor = f"{rep['korthikanti_layer'] / 1e9:>12.3f}" if k == "layer" else ""
        lines.append(
            f"    {k:<26}{mb['measured'][k] / 1e9:>14.3f}{mb['predicted'][k] / 1e9:>12.3f}{kor}"
        )
    lines.append("  rank  layers in-flight " + "".join(f"{k:>13}" for k in (*KINDS, "total")))
    for r in rep["stages"]:
        lines.append(
            f"  {r['rank']:>4}  {r['layers']:>6} {r['in_flight']:>9} "
            + "".join(f"{r[k] / 1e9:>13.2f}" for k in (*KINDS, "total"))
        )
    if "plan" in rep:
        lines.append(
            f"  per-stage plan for {rep['layout']['device_gb']} GB: {rep['plan']['strategies']} "
            f"({'fits' if rep['plan']['fits'] else 'does not fit'})"
        )
    return lines

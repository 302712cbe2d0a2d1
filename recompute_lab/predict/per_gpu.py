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
import math
from typing import Optional

from recompute_lab.predict import devices
from recompute_lab.predict import layout as L
from recompute_lab.config.spec import RunSpec, Shape, as_model_config, config_key
from recompute_lab.predict import theory
from recompute_lab.config import ConfigError
from recompute_lab.predict.peak import ParamTensor, RankView, predict_peak

STRATEGIES = ("none", "selective", "full")  # ascending recompute cost
# Strategies with no closed form whose plan is the same on every block (op-level SAC's saved ops,
# torch_remat's saved sub-regions): one micro-batch is counted on a two-block meta copy with the
# tensor-parallel plan applied (the caller's ``measure``), and block 1 stands for every block.
MEASURED = ("op", "regions")
# What a rank holds between steps (model state) and at the end of forward (activations in
# flight); its peak is the binding phase of recompute_lab.predict.peak (gradients, the loss's
# backward buffers, a recomputing region, FSDP's gathered parameters, optimizer temporaries).
KINDS = ("model_state", "activations")


def core_name(cfg) -> str:
    """The attention core's module name relative to a block: ``attn.core`` in our GPT, the family's
    own in a Hugging Face model (recompute_lab.config.hf_families: Llama's ``self_attn.core``)."""
    hf = getattr(cfg, "hf", None)
    if str(cfg.arch) != "hf" or hf is None or getattr(hf, "model_type", None) is None:
        return "attn.core"
    from recompute_lab.config.hf_families import family_for

    fam = family_for(str(hf.model_type), getattr(hf, "family", None))
    mods = fam.parts.get("attn.core")
    if not mods or len(mods) != 1:
        raise ConfigError(
            f"per-GPU selective recomputation needs the attention core of {fam.name} models; "
            "this family names none (use none or full)"
        )
    return mods[0]


def plan_of(name: str, n_layer: int, cfg=None):
    """A recompute_lab.strategies.Plan for the three fixed strategies, without building a model
    (``cfg``: whose module names; default our GPT's)."""
    from recompute_lab.config.plan import Plan

    if name == "none":
        return None
    if name == "selective":
        core = "attn.core" if cfg is None else core_name(cfg)
        return Plan(
            "selective",
            "attention core recomputed",
            recomputed=[f"blocks.{i}.{core}" for i in range(n_layer)],
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
    """One micro-batch on one rank: bytes per inner block, embeddings (and what the first block
    saves for all of them), final norm + head + loss, the largest
    checkpoint region, the loss's backward buffers. From a two-block copy of ``cfg`` (block 1 stands
    for every
    block after the first), cached: the what-fits grid asks for the same shapes many times."""
    from recompute_lab.predict.tp_theory import predict_rank

    cfg = as_model_config(cfg)
    fields = config_key(cfg)
    key = (fields, tp, sp, strategy, b, s_local, param_bytes, target)
    if key not in _MICRO:
        two = dataclasses.replace(cfg, n_layer=2)
        st = Shape(
            b, s_local, precision="bf16_master" if param_bytes == 2 else "fp32", device=target
        )
        pred = predict_rank(two, st, tp, sp, plan_of(strategy, 2, two))
        if pred["total"] is None:
            raise ConfigError(f"no closed form for {strategy} on this model: {pred['reason']}")
        by = pred["by_module"]
        logits = s_local * b * cfg.vocab_size * 4 // tp  # fp32, vocab-parallel
        # what block 0 saves beyond block 1 (a Hugging Face model's rotary cos / sin and position
        # ids, saved once and shared by every layer) goes with the embeddings on the first stage
        shared = theory.per_layer(pred, 0) - theory.per_layer(pred, 1)
        _MICRO[key] = {
            "layer": theory.per_layer(pred, 1),
            # tensors block 1 saves (offload's per-tensor hooks, recompute_lab.predict.step_time)
            "layer_tensors": sum(str(t["module"]).startswith("blocks.1.") for t in pred["terms"]),
            "first": shared + sum(v for k, v in by.items() if L.role_of(k) == "first"),
            "last": sum(v for k, v in by.items() if L.role_of(k) == "last"),
            "region": pred["largest_region"],
            "loss_backward": 2 * logits,
        }
    return _MICRO[key]


def rank_shape(lay, batch: int, seq: int, precision: str, target: str, fp32_grad_accum=False):
    """The micro-batch one GPU of ``lay`` sees (s / cp tokens) and how its model state is kept:
    FSDP2 shards over dp_shard, replicas alone (dp_replicate) keep DDP's gradient buckets."""
    ds, dr = int(lay.dp_shard), int(lay.dp_replicate)
    parallel = "fsdp" if ds > 1 else ("ddp" if dr > 1 else "none")
    return Shape(
        batch,
        seq // int(lay.cp),
        precision=precision,
        fp32_grad_accum=fp32_grad_accum,
        device=target,
        parallel=parallel,
        world_size=ds if ds > 1 else dr,
    )


# (model fields, tp, pp, v, rank) -> RankView: planners ask for the same views thousands of times
_VIEWS: dict = {}


def view_of(cfg, lay, rank: int) -> RankView:
    """Pipeline rank ``rank``'s parameters at their tensor-parallel local shapes, and its layers
    (cached per model and layout: a view is a function of them alone)."""
    key = (
        config_key(as_model_config(cfg)),
        int(lay.tp),
        int(lay.pp),
        int(lay.pp_virtual),
        rank,
    )
    if key not in _VIEWS:
        _VIEWS[key] = _build_view(cfg, lay, rank)
    return _VIEWS[key]


def _build_view(cfg, lay, rank: int) -> RankView:
    counts = L.stage_layers(cfg.n_layer, int(lay.pp), int(lay.pp_virtual))
    chunks = range(rank, len(counts), int(lay.pp))
    tp = int(lay.tp)
    params, seen = [], {}
    for p in L.stage_params(cfg, lay, rank):  # the stage's blocks renumbered 0, 1, ...
        name = p.name
        if name.startswith("blocks."):
            i = seen[name] = seen.get(name, -1) + 1
            name = f"blocks.{i}." + name.split(".", 2)[2]
        params.append(ParamTensor(name, L.tp_local_shape(p, tp)))
    return RankView(
        params=tuple(params),
        layers=sum(counts[k] for k in chunks),
        tp=tp,
        first=0 in chunks,
        last=len(counts) - 1 in chunks,
    )


def rank_peak(
    cfg, lay, st: Shape, rank: int, state: dict, act: int, region: int, view=None
) -> dict:
    """The step's peak on pipeline rank ``rank`` (recompute_lab.predict.peak.predict_peak, the
    one-device phases on this rank's share of the model): ``act`` saved bytes in flight, ``region``
    the largest checkpoint region's re-saved bytes (``view``: the rank's, when the caller has
    it)."""
    return predict_peak(
        cfg,
        st,
        state,
        {"total": act, "largest_region": region},
        view if view is not None else view_of(cfg, lay, rank),
    )


def in_flight_bytes(lay, mb: dict, rank: int, per_chunk: list[int]) -> int:
    """Bytes pipeline rank ``rank`` holds in flight when stage chunk k's layers save
    ``per_chunk[k]`` per micro-batch (plus ``mb``'s embeddings share on chunk 0 and the head's on
    the last): 1F1B keeps its chunk's count in flight, interleaved schedules PyTorch's action list
    (only this rank's chunks k = rank, rank + pp, ... matter)."""
    pp, v, m = int(lay.pp), int(lay.pp_virtual), L.microbatches(lay)
    last = len(per_chunk) - 1
    chunk = [
        x + (mb["first"] if k == 0 else 0) + (mb["last"] if k == last else 0)
        for k, x in enumerate(per_chunk)
    ]
    if str(lay.pp_schedule) == "1f1b":
        return L.in_flight_chunks("1f1b", pp, m, rank) * chunk[rank]
    return L.schedule_in_flight("interleaved", pp, m, v, chunk)[rank]


def stage_bytes(
    cfg,
    lay,
    strategy: str,
    batch: int,
    seq: int,
    precision: str = "bf16_master",
    target: str = "cuda",
    stages: Optional[list] = None,
    fp32_grad_accum: bool = False,
    micro: Optional[dict] = None,
) -> list[dict]:
    """Per pipeline rank: model state, activations in flight (:data:`KINDS`) and the step's peak
    (``total``, its binding ``phase`` and every phase), for ``strategy`` on every stage (or
    ``stages[r]`` on rank r). ``micro``: one micro-batch's bytes (layer, first, last, region)
    counted by the caller, for a strategy of :data:`MEASURED`."""
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
    st = rank_shape(lay, batch, seq, precision, target, fp32_grad_accum)
    out = []
    for rank in range(pp):
        strat = stages[rank] if stages else strategy
        mb = micro or micro_batch(cfg, tp, sp, strat, batch, seq // cp, pbytes, target)

        act = in_flight_bytes(lay, mb, rank, [c * mb["layer"] for c in counts])
        state = L.model_state_per_rank(cfg, lay, precision, fp32_grad_accum, stage=rank)
        peak = rank_peak(cfg, lay, st, rank, state, act, mb["region"])
        out.append(
            {
                "rank": rank,
                "strategy": strat,
                "layers": sum(counts[k] for k in range(rank, n_chunks, pp)),
                "in_flight": (L.in_flight_chunks(sched, pp, m, rank, v)),
                "model_state": state["total"],
                "activations": act,
                "phase": peak["phase"],
                "phases": peak["phases"],
                "region": mb["region"],
                "total": peak["total"],
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
    budget: int,
    batch: int,
    seq: int,
    precision: str = "bf16_master",
    target: str = "cuda",
    fp32_grad_accum: bool = False,
) -> dict:
    """Per stage, the plan with the fewest recompute FLOPs whose step peak fits ``budget`` (the
    bytes a card leaves a step after its reserve: recompute_lab.predict.devices.Device.budget; ties:
    fewer bytes): a base strategy (none or selective) on the stage's layers but n, full
    recomputation on n of them (Megatron's --recompute-num-layers, chosen per stage: early 1F1B
    stages keep more micro-batches in flight). Interleaved schedules (a rank holds several chunks)
    choose per stage among the three whole strategies only. A stage where nothing fits gets None.
    Returns {"stages": [...], "strategies": [labels], "fits": bool}."""
    tp, cp, v, pp = int(lay.tp), int(lay.cp), int(lay.pp_virtual), int(lay.pp)
    sp = bool(lay.sp) and tp > 1
    pbytes = 2 if precision == "bf16_master" else 4
    m = L.microbatches(lay)
    st = rank_shape(lay, batch, seq, precision, target, fp32_grad_accum)
    rows = {
        name: stage_bytes(
            cfg, lay, name, batch, seq, precision, target, fp32_grad_accum=fp32_grad_accum
        )
        for name in STRATEGIES
    }
    layer = {
        name: micro_batch(cfg, tp, sp, name, batch, seq // cp, pbytes, target)["layer"]
        for name in STRATEGIES
    }
    cost = {name: layer_recompute_flops(cfg, name, batch, seq, tp, cp) for name in STRATEGIES}
    chosen: list = []
    out: list = []
    for rank in range(pp):
        best = None
        state = L.model_state_per_rank(cfg, lay, precision, fp32_grad_accum, stage=rank)
        view = view_of(cfg, lay, rank)
        for base in ("none", "selective"):
            n_layers = rows[base][rank]["layers"]

            def candidate(n, base=base, rank=rank, state=state, view=view) -> dict:
                return _n_full(cfg, lay, st, rows, layer, cost, m, base, rank, n, state, view)

            # recompute FLOPs grow with n (full costs more per layer than either base), so the
            # cheapest plan that fits is the smallest n that fits. n = 0 first: from n = 1 on a
            # block's recompute re-saves its tensors (the recompute phase), so the peak can
            # rise from 0 to 1; from 1 to L it only falls (each layer moved to full saves
            # less), which a bisection finds. When not even n = L fits, the ends are compared
            # on (fits, FLOPs, bytes) as every n was before.
            if v == 1 and candidate(0)["total"] <= budget:
                tried = (0,)
            elif v == 1 and candidate(n_layers)["total"] <= budget:
                lo, hi = 1, n_layers  # candidate(hi) fits
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if candidate(mid)["total"] <= budget else (mid + 1, hi)
                tried = (lo,)
            else:
                tried = (0, n_layers)
            for n in tried:
                cand = candidate(n)
                key = (cand["total"] > budget, cand["recompute_flops"], cand["total"])
                if best is None or key < best[0]:
                    best = (key, cand)
        fits = not best[0][0]
        chosen.append(best[1]["strategy"] if fits else None)
        out.append(best[1] if fits else {**rows["full"][rank], "strategy": None})
    return {"stages": out, "strategies": chosen, "fits": all(c is not None for c in chosen)}


def _n_full(cfg, lay, st, rows, layer, cost, m, base, rank, n, state, view) -> dict:
    """Rank ``rank``'s row for ``base`` on its layers but n, full recomputation on n (plan_stages'
    candidate): n = 0 and n = L are the base's and full's rows themselves."""
    row = rows[base][rank]
    n_layers = row["layers"]
    if n == n_layers:  # every layer recomputed: the full row itself
        cand = dict(rows["full"][rank], strategy="full")
    elif n == 0:
        cand = dict(row, strategy=base)
    else:
        act = row["activations"] + row["in_flight"] * n * (layer["full"] - layer[base])
        region = max(row["region"], rows["full"][rank]["region"])
        peak = rank_peak(cfg, lay, st, rank, state, act, region, view)
        cand = {
            **row,
            "activations": act,
            "phase": peak["phase"],
            "phases": peak["phases"],
            "region": region,
            "total": peak["total"],
            "strategy": f"{base} + {n}/{n_layers} full",
        }
    cand.update(full_layers=n, recompute_flops=m * (n * cost["full"] + (n_layers - n) * cost[base]))
    return cand


def compare(
    cfg,
    lay,
    batch: int,
    seq: int,
    precision: str,
    target: str,
    device=None,
    fp32_grad_accum: bool = False,
) -> list[dict]:
    """Every whole strategy under ``lay``: the busiest rank's peak, its binding phase, recompute
    FLOPs per step on that rank and (``device``: a recompute_lab.predict.devices.Device) the
    reserve, the margin left and whether it fits."""
    tp, cp = int(lay.tp), int(lay.cp)
    m = L.microbatches(lay)
    out = []
    for name in STRATEGIES:
        rows = stage_bytes(
            cfg, lay, name, batch, seq, precision, target, fp32_grad_accum=fp32_grad_accum
        )
        busiest = max(rows, key=lambda r: r["total"])
        flops = m * busiest["layers"] * layer_recompute_flops(cfg, name, batch, seq, tp, cp)
        out.append(strategy_row(name, rows, flops, device, lay))
    return out


def strategy_row(name: str, rows: list[dict], recompute_flops, device, lay) -> dict:
    """A strategy's line in the side-by-side comparison: its busiest rank (of ``rows``, from
    :func:`stage_bytes`), that rank's peak and phase, ``recompute_flops`` (None: no module formula)
    and, ``device`` given, the fit after the reserve."""
    busiest = max(rows, key=lambda r: r["total"])
    row = {
        "strategy": name,
        "rank": busiest["rank"],
        "peak": busiest["total"],
        "phase": busiest["phase"],
        "recompute_flops": recompute_flops,
    }
    if device is not None:
        row["fit"] = device.fit(busiest["total"], devices.communicators(lay))
    return row


def largest_fitting(peak_of, lo: int, hi: int, step: int = 1) -> Optional[int]:
    """The largest multiple of ``step`` in [lo, hi] whose ``peak_of(x)`` (monotone in x) fits (a
    bool); None when even ``lo`` does not. Bisection: O(log((hi - lo) / step)) evaluations."""
    lo, hi = -(-lo // step), hi // step  # in units of step
    if lo > hi or not peak_of(lo * step):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak_of(mid * step):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


MAX_MICRO_BATCH = 1024
MAX_SEQ = 2**21  # 2M tokens: beyond any context a single sample is trained on today


def largest(
    cfg,
    lay,
    strategy: str,
    batch: int,
    seq: int,
    precision: str,
    target: str,
    device,
    fp32_grad_accum: bool = False,
) -> dict:
    """The inverse questions for ``strategy`` under ``lay`` on ``device``: the largest micro-batch
    at ``seq`` tokens and the largest sequence length at micro-batch ``batch`` whose busiest rank
    fits after the reserve. Sequence lengths are multiples of 256 and of what the layout splits
    them by (cp, and tp under sequence parallelism); learned positions cap them at the table's
    length."""
    groups = devices.communicators(lay)
    tp, cp = int(lay.tp), int(lay.cp)
    unit = math.lcm(256, cp * (tp if bool(lay.sp) and tp > 1 else 1))
    top = MAX_SEQ if str(cfg.positions) != "learned" else int(cfg.max_seq_len)

    def fits(b: int, s: int) -> bool:
        model = cfg
        if s > int(cfg.max_seq_len) and str(cfg.positions) != "learned":
            model = dataclasses.replace(as_model_config(cfg), max_seq_len=s)  # rope tables grow
        rows = stage_bytes(
            model, lay, strategy, b, s, precision, target, fp32_grad_accum=fp32_grad_accum
        )
        return device.fit(max(r["total"] for r in rows), groups)["fits"]

    return {
        "strategy": strategy,
        "micro_batch": largest_fitting(lambda b: fits(b, seq), 1, MAX_MICRO_BATCH),
        "seq": largest_fitting(lambda s: fits(batch, s), unit, top, unit),
        "seq_unit": unit,
    }


def layout_estimate(
    cfg,
    lay,
    strategy: str,
    batch: int,
    seq: int,
    precision: str,
    target: str,
    measure=None,
    fp32_grad_accum: bool = False,
    options=None,
    planned: Optional[dict] = None,
) -> dict:
    """estimate's per-GPU section: one micro-batch measured on meta (``measure``: the caller's
    recompute_lab.measure.tensor_parallel.measure_micro_batch, so this layer imports no torch)
    beside the per-rank theory, every pipeline rank's peak by phase, and (a card given:
    estimate.layout.gpu / device_gib / device_gb) the fit after the reserve, every strategy side by
    side, the per-stage plan and the largest micro-batch and sequence that fit. ``options``: the
    configured strategy's typed options, for :data:`MEASURED` strategies, whose micro-batch is the
    meta count alone (no closed form). ``planned``: for ``budget``, the per-stage plan of
    recompute_lab.strategies.budget.layout.budget_layout (every option priced per rank; this layer
    runs no model)."""
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
    common = dict(precision=precision, target=target, fp32_grad_accum=fp32_grad_accum)
    if strategy in STRATEGIES:
        measured = measure(cfg, tp, sp, strategy, batch, seq // cp, pbytes, target)
        predicted = micro_batch(cfg, tp, sp, strategy, batch, seq // cp, pbytes, target)
        micro = None
    elif strategy in MEASURED:
        measured = measure(cfg, tp, sp, options or strategy, batch, seq // cp, pbytes, target)
        predicted = {k: None for k in ("layer", "first", "last")}
        # as the one-device path prices a meta-counted plan (recompute_lab.predict.prediction):
        # no recompute-phase transient beyond what the count holds
        micro = {**measured, "region": 0}
    elif strategy == "budget":
        if planned is None:
            raise ConfigError(
                "per-GPU budget plans need the options priced per rank "
                "(recompute_lab.strategies.budget.layout.budget_layout)"
            )
        # the micro-batch table shows `none`: each stage mixes options layer by layer
        measured = measure(cfg, tp, sp, "none", batch, seq // cp, pbytes, target)
        predicted = micro_batch(cfg, tp, sp, "none", batch, seq // cp, pbytes, target)
        micro = None
    else:
        raise ConfigError(
            f"per-GPU planning knows strategies {', '.join(STRATEGIES + MEASURED)} and budget, "
            f"not {strategy!r}"
        )
    if planned is not None:
        stages = planned["stages"]
    else:
        stages = stage_bytes(cfg, lay, strategy, batch, seq, micro=micro, **common)
    device = devices.device_of(lay)
    if device is None and planned is not None:  # the card came with strategy.device_memory_gb
        device = planned["card"]
    groups = devices.communicators(lay)
    out = {
        "layout": {k: (str(v) if k == "pp_schedule" else v) for k, v in lay.items()},
        "gpus": L.n_gpus(lay),
        "communicators": groups,
        "micro_batch": {"measured": measured, "predicted": predicted},
        "stages": stages,
        "korthikanti_layer": L.korthikanti_tp_layer_bytes(
            seq // cp, batch, cfg.d_model, cfg.n_head, tp, sp, strategy
        )
        if strategy in STRATEGIES
        else None,
        "strategies": compare(cfg, lay, batch, seq, device=device, **common),
    }
    if micro is not None:  # the configured strategy beside the three; per-op choices' FLOPs
        # are counted by a run, not by module formulas
        out["strategies"].append(strategy_row(strategy, stages, None, device, lay))
    if planned is not None:  # the budget plan's FLOPs: its probed options' on the busiest rank
        busiest = max(stages, key=lambda r: r["total"])
        out["strategies"].append(
            strategy_row("budget", stages, busiest["recompute_flops"], device, lay)
        )
        card = planned["card"]
        out["budget"] = {
            "strategies": planned["strategies"],
            "fits": planned["fits"],
            "peak_limit": planned["limit"],
            "card": card.name,
            "objective": planned["objective"],
            "notes": planned["notes"],
            "option_prices": planned["option_prices"],
        }
    if device is not None:
        busiest = max(stages, key=lambda r: r["total"])
        out["device"] = {
            "name": device.name,
            "total_bytes": device.total_bytes,
            "source": device.source,
            "budget_bytes": device.budget(groups),
        }
        out["fit"] = device.fit(busiest["total"], groups)
        out["plan"] = plan_stages(cfg, lay, device.budget(groups), batch, seq, **common)
        out["largest"] = [
            largest(cfg, lay, name, batch, seq, device=device, **common) for name in STRATEGIES
        ]
    return out


def _gib(x) -> str:
    return "-" if x is None else f"{x / devices.GiB:.2f}"


def format_layout(rep: dict) -> list[str]:
    """estimate's table lines for the layout section (GiB = 2^30 B, as cards are sold and
    reported)."""
    lay, mb = rep["layout"], rep["micro_batch"]
    lines = [
        f"per GPU under tp={lay['tp']} (sp={lay['sp']}) pp={lay['pp']} ({lay['pp_schedule']}, "
        f"v={lay['pp_virtual']}, m={lay['microbatches'] or lay['pp']}) cp={lay['cp']} "
        f"dp_shard={lay['dp_shard']} "
        f"dp_replicate={lay['dp_replicate']}: {rep['gpus']} GPUs, GiB = 2^30 B",
        "  one micro-batch per rank, GiB  measured (meta, PyTorch TP)   theory   Korthikanti/layer "
        "(eager s^2)",
    ]
    for k in ("layer", "first", "last"):
        kor = f"{_gib(rep['korthikanti_layer']):>12}" if k == "layer" else ""
        lines.append(f"    {k:<26}{_gib(mb['measured'][k]):>14}{_gib(mb['predicted'][k]):>12}{kor}")
    lines.append(
        "  rank  layers in-flight" + "".join(f"{k:>13}" for k in (*KINDS, "peak")) + "  phase"
    )
    for r in rep["stages"]:
        lines.append(
            f"  {r['rank']:>4}  {r['layers']:>6} {r['in_flight']:>9}"
            + "".join(f"{_gib(r[k]):>13}" for k in (*KINDS, "total"))
            + f"  {r['phase']}"
        )
    dev = rep.get("device")
    if dev is not None:
        fit = rep["fit"]
        res = fit["reserve"]
        lines.append(
            f"  card {dev['name']}: {_gib(dev['total_bytes'])} GiB ({dev['source']}); reserve "
            f"{_gib(res['total'])} GiB = CUDA context {_gib(res['cuda_context'])} + NCCL "
            f"{_gib(res['communication'])} ({rep['communicators']} communicator"
            f"{'' if rep['communicators'] == 1 else 's'}) + fragmentation "
            f"{_gib(res['fragmentation'])}"
        )
        verdict = "fits" if fit["fits"] else "does NOT fit"
        lines.append(
            f"  busiest rank peak {_gib(fit['peak_bytes'])} + reserve {_gib(res['total'])} = "
            f"{fit['used_fraction']:.1%} of the card: {verdict}, margin "
            f"{_gib(fit['margin_bytes'])} GiB"
        )
    lines.append(
        "  every strategy, busiest rank    peak GiB  phase              recompute TFLOP/step"
        + ("   margin GiB  verdict" if dev is not None else "")
    )
    for r in rep["strategies"]:
        line = f"    {r['strategy']:<28}{_gib(r['peak']):>9}  {r['phase']:<19}" + (
            f"{r['recompute_flops'] / 1e12:>20.1f}"
            if r["recompute_flops"] is not None
            else f"{'(run counts)':>20}"
        )
        if "fit" in r:
            verdict = "fits" if r["fit"]["fits"] else "does not fit"
            line += f"{_gib(r['fit']['margin_bytes']):>13}  {verdict}"
        lines.append(line)
    if "budget" in rep:
        bud = rep["budget"]
        lines.append(
            f"  budget plan per stage ({bud['objective']}; every option priced per rank; peak <= "
            f"{_gib(bud['peak_limit'])} GiB on {bud['card']}): "
            + ("fits" if bud["fits"] else "does not fit")
        )
        for r in rep["stages"]:
            what = r["strategy"] or "nothing fits (all layers block shown)"
            lines.append(
                f"    stage {r['rank']}: {what}; recompute "
                f"{r['recompute_flops'] / 1e12:.1f} TFLOP/step"
            )
        lines += [f"    note: {n}" for n in bud["notes"]]
    if "plan" in rep:
        lines.append(
            f"  per-stage plan for {dev['name']} after the reserve "
            f"(peak <= {_gib(dev['budget_bytes'])} GiB): {rep['plan']['strategies']} "
            f"({'fits' if rep['plan']['fits'] else 'does not fit'})"
        )
    for r in rep.get("largest", []):
        mb_, seq = r["micro_batch"], r["seq"]
        mb_txt = "no micro-batch" if mb_ is None else f"micro-batch {mb_}"
        seq_txt = "no seq_len" if seq is None else f"seq_len {seq:,}"
        lines.append(
            f"  largest that fits under {r['strategy']}: {mb_txt} at this seq_len; {seq_txt} at "
            f"this micro-batch (multiples of {r['seq_unit']})"
        )
    return lines

"""The budget planner under a parallel layout: per pipeline stage, the cheapest per-layer mix of
every option the planner knows whose step peak on that stage's busiest GPU fits the card after its
reserve.

The one-device planner (recompute_lab.strategies.budget) prices options on one-block replicas and
solves once for the whole model. Under ``estimate.layout`` a layer's saved bytes are a rank's:
tensor (+ sequence) parallel shards, s / cp tokens. So each option is priced per rank:

  bytes     the option applied to every block of two- and three-block copies on the meta device
            with PyTorch's tensor-parallel plan over a fake process group
            (recompute_lab.measure.tensor_parallel.measure_micro_batch's resident count, the same
            count per_gpu's op / regions rows use): a layer is the difference. `none`, `attn.core`
            and `block` equal the per-rank theory's none / selective / full layer (a test holds
            them to it).
  FLOPs     the one-device probe's recompute FLOPs at (b, s / cp) split over tp (matmuls and
            attention kernels shard over heads, d_ff and vocab; FlopCounterMode counts nothing
            else); under cp an option that reruns the attention core meets all s keys, so its
            core FLOPs scale by cp (as recompute_lab.predict.per_gpu.layer_recompute_flops).
  re-save  what a layer run that way re-saves while it recomputes (the one-device rule: none's
            bytes less the option's).

Per stage (1F1B: k micro-batches in flight, L layers): for each re-save level the step's peak on
that rank (recompute_lab.predict.prediction.activation_headroom with the rank's view and model
state) gives the most in-flight bytes; a layer mix may save (that / k) less the stage's
embeddings / head share, and the solver (recompute_lab.strategies.budget.solver) picks the
cheapest mix of L layers within it. Interleaved schedules hold several chunks per rank with
different counts in flight: there every layer of a stage runs one option (the cheapest that fits).
The chosen plan is checked with per_gpu.rank_peak, the function every per-GPU row uses.

Layer: strategies.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from recompute_lab.config import ConfigError
from recompute_lab.config.spec import Shape, as_model_config
from recompute_lab.predict import devices
from recompute_lab.predict import layout as L
from recompute_lab.predict import per_gpu
from recompute_lab.predict import prediction
from recompute_lab.predict.flops import module_forward_flops
from recompute_lab.config.spec import RunSpec
from recompute_lab.strategies.budget.options import Option, apply_option
from recompute_lab.strategies.budget.solver import (
    cheapest_within,
    cost_key,
    pareto_plans,
    undominated,
)
from recompute_lab.strategies.wrap import RngStateHook

log = logging.getLogger(__name__)


def reruns_core(opt: Option) -> bool:
    """Does a block run as ``opt`` rerun its attention core in backward? (op-level SAC saves the
    attention kernels' outputs; a region plan reruns the core unless it is in the save list.)"""
    if opt.kind == "block":
        return True
    if opt.kind == "modules":
        return "attn.core" in opt.modules or "attn" in opt.modules
    if opt.kind == "regions":
        return "attn.core" not in opt.modules
    return False


def every_block(opt: Option):
    """A callable that runs every block of a model as ``opt`` (measure_micro_batch's strategy)."""

    def apply(model) -> None:
        hook = RngStateHook(model.tok_emb.weight.device)
        for i in range(len(model.blocks)):
            apply_option(model, i, opt, hook)

    return apply


@dataclasses.dataclass(frozen=True)
class RankPrice:
    """One option on one rank, per layer and micro-batch: saved bytes, recompute FLOPs, the
    pointwise bytes its rerun moves, what it re-saves while recomputing, and what blocks run this
    way keep once between them beyond `none`'s first-stage share (Hugging Face layers' arguments
    held by every checkpoint region: counted on every stage, as each stage's regions hold them)."""

    option: Option
    bytes: int
    flops: int
    pointwise_bytes: int
    resaved: int
    shared: int = 0  # kept once by all blocks run this way (a Hugging Face layer's arguments)


def price_options(
    model_cfg: Any,
    lay,
    batch: int,
    seq: int,
    precision: str,
    target: str,
    measure,
) -> tuple[list[RankPrice], list[str]]:
    """Every planner option of ``model_cfg``'s blocks priced per rank of ``lay`` (module
    docstring), and notes on options left out. ``measure``:
    recompute_lab.measure.tensor_parallel.measure_micro_batch."""
    import torch

    from recompute_lab.model.gpt import build_model
    from recompute_lab.strategies.budget.probe import probe_model

    cfg = as_model_config(model_cfg)
    tp, cp = int(lay.tp), int(lay.cp)
    sp = bool(lay.sp) and tp > 1
    s_local = seq // cp
    pbytes = 2 if precision == "bf16_master" else 4
    dtype = torch.bfloat16 if pbytes == 2 else torch.float32
    small = dataclasses.replace(cfg, n_layer=1, max_seq_len=max(int(cfg.max_seq_len), s_local))
    model = build_model(small, "meta", dtype)
    probed = probe_model(model, Shape(batch, s_local, precision=precision, device=target))
    core = module_forward_flops(RunSpec(model=small), batch, s_local)["attn.core"]
    out, notes = [], []
    for opt, price in zip(probed.options, probed.prices):
        if opt.kind == "regions" and tp > 1:
            # torch_remat re-creates saved views with as_strided, which DTensor refuses
            notes.append(f"option {opt.name} left out: torch_remat regions do not run on DTensor")
            continue
        counted = measure(cfg, tp, sp, every_block(opt), batch, s_local, pbytes, target)
        flops = price.flops + (core * (cp - 1) if reruns_core(opt) else 0)
        out.append(
            RankPrice(
                opt, counted["layer"], flops // tp, price.pointwise_bytes // tp, 0, counted["first"]
            )
        )
    none = out[0]  # options[0] is always none
    return [
        dataclasses.replace(
            p, resaved=max(none.bytes - p.bytes, 0), shared=max(p.shared - none.shared, 0)
        )
        for p in out
    ], notes


def card_of(lay, opts) -> devices.Device:
    """The card the per-stage budget plans for: estimate.layout's (gpu / device_gib / device_gb) or
    strategy.device_memory_gb (1e9 B) with recompute_lab.predict.devices' reserve."""
    card = devices.device_of(lay)
    gb = getattr(opts, "device_memory_gb", None)
    if getattr(opts, "budget_bytes", None) is not None:
        raise ConfigError(
            "strategy.budget_bytes is one device's activation budget; under estimate.layout the "
            "budget planner plans each stage's step peak against a card: set estimate.layout.gpu "
            f"({', '.join(sorted(devices.CARDS))}), estimate.layout.device_gib or "
            "strategy.device_memory_gb"
        )
    if card is not None and gb is not None:
        raise ConfigError(
            "set one card: estimate.layout.gpu / device_gib / device_gb or "
            "strategy.device_memory_gb, not both"
        )
    if card is None and gb is None:
        raise ConfigError(
            "+strategy=budget under estimate.layout plans each stage against a card: set "
            f"estimate.layout.gpu ({', '.join(sorted(devices.CARDS))}), "
            "estimate.layout.device_gib or strategy.device_memory_gb"
        )
    if card is None:  # the one-device planner's card for the same option, on a GPU
        from recompute_lab.strategies.budget import device_of

        card = device_of(opts, Shape(1, 1, device="cuda"))
    return card


def _label(counts: dict) -> str:
    return "budget: " + " + ".join(f"{n} {name}" for name, n in counts.items() if n)


def plan_layout(
    model_cfg: Any,
    lay,
    prices: list[RankPrice],
    limit: int,
    batch: int,
    seq: int,
    precision: str = "bf16_master",
    target: str = "cuda",
    fp32_grad_accum: bool = False,
    objective: str = "flops",
    rates: Optional[dict] = None,
) -> dict:
    """Per pipeline stage, the cheapest layer mix of ``prices``' options whose step peak stays
    within ``limit`` bytes (module docstring). Returns {"stages": per_gpu.stage_bytes-like rows
    with ``chosen`` (option name -> layers), ``recompute_flops`` per step and ``fits``;
    "fits": every stage fits; "limit": ``limit``}. A stage where nothing fits carries its
    all-`block` row and strategy None."""
    cfg = as_model_config(model_cfg)
    tp, cp, v, pp = int(lay.tp), int(lay.cp), int(lay.pp_virtual), int(lay.pp)
    sp = bool(lay.sp) and tp > 1
    pbytes = 2 if precision == "bf16_master" else 4
    m, sched = L.microbatches(lay), str(lay.pp_schedule)
    counts = L.stage_layers(cfg.n_layer, pp, v)
    n_chunks = len(counts)
    st = per_gpu.rank_shape(lay, batch, seq, precision, target, fp32_grad_accum)
    mb = per_gpu.micro_batch(cfg, tp, sp, "none", batch, seq // cp, pbytes, target)
    sizes = [p.bytes for p in prices]
    costs = [cost_key(p, objective, rates) for p in prices]  # RankPrice has Price's cost fields
    names = [p.option.name for p in prices]
    stages = []
    for rank in range(pp):
        chunks = range(rank, n_chunks, pp)
        layers = sum(counts[k] for k in chunks)
        state = L.model_state_per_rank(cfg, lay, precision, fp32_grad_accum, stage=rank)
        view = per_gpu.view_of(cfg, lay, rank)
        outside = (mb["first"] if 0 in chunks else 0) + (
            mb["last"] if n_chunks - 1 in chunks else 0
        )

        best = None  # (cost, bytes, option counts, activations, region)
        if sched == "1f1b":
            k = L.in_flight_chunks("1f1b", pp, m, rank)
            for level in sorted({p.resaved for p in prices}):
                room = prediction.activation_headroom(cfg, st, limit, level, view=view, state=state)
                if room["bytes"] is None:
                    break  # a larger re-save only adds to the recompute phase
                # options that keep shared bytes: solved with them added, and without them
                for extra in sorted({max(p.shared for p in prices), 0}, reverse=True):
                    capacity = room["bytes"] // k - outside - extra
                    allowed = [
                        o
                        for o, p in enumerate(prices)
                        if p.resaved <= level and (extra or not p.shared)
                    ]
                    keep = [
                        allowed[j]
                        for j in undominated(
                            [sizes[o] for o in allowed], [costs[o] for o in allowed]
                        )
                    ]
                    frontier = pareto_plans(
                        layers, [sizes[o] for o in keep], [costs[o] for o in keep]
                    )
                    hit = cheapest_within(frontier, capacity)
                    if hit is None:
                        continue
                    used = {names[keep[j]]: n for j, n in enumerate(hit[2]) if n}
                    region = max(prices[keep[j]].resaved for j, n in enumerate(hit[2]) if n)
                    cand = (hit[1], hit[0] + extra, used, k * (hit[0] + outside + extra), region)
                    if best is None or cand[:2] < best[:2]:
                        best = cand
        else:  # interleaved: one option for all of this rank's layers
            for o, p in enumerate(prices):
                act = per_gpu.in_flight_bytes(
                    lay, mb, rank, [c * p.bytes + p.shared for c in counts]
                )
                peak = per_gpu.rank_peak(cfg, lay, st, rank, state, act, p.resaved)
                if peak["total"] > limit:
                    continue
                cost = tuple(layers * c for c in costs[o])
                cand = (cost, layers * p.bytes, {p.option.name: layers}, act, p.resaved)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is None:
            full = next(p for p in prices if p.option.kind == "block")
            act = per_gpu.in_flight_bytes(
                lay, mb, rank, [c * full.bytes + full.shared for c in counts]
            )
            peak = per_gpu.rank_peak(cfg, lay, st, rank, state, act, full.resaved)
            chosen, region, strategy = {full.option.name: layers}, full.resaved, None
        else:
            _, _, chosen, act, region = best
            peak = per_gpu.rank_peak(cfg, lay, st, rank, state, act, region)
            strategy = _label(chosen)
            if peak["total"] > limit:  # the headroom and the peak function disagree: a bug
                raise RuntimeError(
                    f"stage {rank}'s budget plan peaks at {peak['total']} B ({peak['phase']}), "
                    f"above the {limit} B it was solved for"
                )
        by_name = {p.option.name: p for p in prices}
        stages.append(
            {
                "rank": rank,
                "strategy": strategy,
                "layers": layers,
                "in_flight": L.in_flight_chunks(sched, pp, m, rank, v),
                "model_state": state["total"],
                "activations": act,
                "phase": peak["phase"],
                "phases": peak["phases"],
                "region": region,
                "total": peak["total"],
                "chosen": chosen,
                "recompute_flops": m * sum(n * by_name[k].flops for k, n in chosen.items()),
                "fits": strategy is not None,
            }
        )
    return {
        "stages": stages,
        "strategies": [r["strategy"] for r in stages],
        "fits": all(r["fits"] for r in stages),
        "limit": limit,
    }


def budget_layout(
    model_cfg: Any,
    lay,
    opts,
    batch: int,
    seq: int,
    precision: str,
    target: str,
    measure,
    fp32_grad_accum: bool = False,
) -> dict:
    """``+strategy=budget`` under ``estimate.layout``: the options priced per rank, the card and
    its reserve, and :func:`plan_layout`'s per-stage plan against the largest step peak the card
    allows (recompute_lab.predict.devices.Device.budget)."""
    card = card_of(lay, opts)
    groups = devices.communicators(lay)
    limit = card.budget(groups)
    prices, notes = price_options(model_cfg, lay, batch, seq, precision, target, measure)
    objective = str(getattr(opts, "objective", "flops"))
    rates = None
    if objective == "time":
        import torch

        from recompute_lab.measure.hardware import roofline_rates

        rates = roofline_rates(
            torch.device("meta"), torch.bfloat16 if precision == "bf16_master" else torch.float32
        )
    plan = plan_layout(
        model_cfg,
        lay,
        prices,
        limit,
        batch,
        seq,
        precision,
        target,
        fp32_grad_accum,
        objective,
        rates,
    )
    log.info(
        "budget under the layout: %s (%s on %s)",
        plan["strategies"],
        "fits" if plan["fits"] else "does not fit",
        card.name,
    )
    return {
        **plan,
        "card": card,
        "objective": objective,
        "notes": notes,
        "option_prices": [
            {
                "option": p.option.name,
                "bytes": p.bytes,
                "flops": p.flops,
                "pointwise_bytes": p.pointwise_bytes,
                "resaved": p.resaved,
            }
            for p in prices
        ],
    }

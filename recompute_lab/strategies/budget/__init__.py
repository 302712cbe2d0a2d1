"""The ``budget`` strategy: the cheapest per-block recomputation plan whose saved activations fit a
memory budget.

torch.compile's ``activation_memory_budget`` (and torchtitan's ``memory_budget`` built on it) solve
this for
compiled graphs only. Here it is done in eager mode, over options built from the existing wrapping
helpers
(``options``), priced by one-block probes on the model's own device (``probe``), solved exactly
(``solver``).

Budget: ``budget_bytes``, or ``budget_fraction`` of ``none``'s probed activation bytes (the
default 0.5), or ``device_memory_gb`` (1e9 bytes, the card's memory): then the plan's predicted
step peak (recompute_lab.predict.prediction, every phase: backward start, recompute, end of
backward, clip, optimizer step, and any phase predict_peak adds) plus the device reserve of
recompute_lab.predict.devices on CUDA must fit, and the plan records which phase binds; a phase
that overflows the device with nothing saved is a ConfigError naming it. Options are priced in the
run's precision (autocast included: its fp32 residual inputs and bf16 weight copies count), exactly
on CPU and CUDA; on the meta device they save what the target's kernels save (TargetKernels), but
autocast cannot run, so there autocast prices are upper bounds and the plan carries a warning.
Out of scope: block groups (layers uniform, sqrt) save one input per group and so reach below full
recomputation; the smallest budget this planner reaches is that of full recomputation.

Layer: strategies.
"""

from __future__ import annotations

import dataclasses
import logging

from recompute_lab.predict import prediction
from recompute_lab.predict.devices import Device, Reserve
from recompute_lab.config import ConfigError
from recompute_lab.config.strategies import DEFAULT_FRACTION, BudgetConfig, Objective  # noqa: F401
from recompute_lab.measure.hardware import roofline_rates
from recompute_lab.model.gpt import GPT
from recompute_lab.strategies.base import Plan, Shape, register
from recompute_lab.strategies.budget.options import Option, apply_option, block_options
from recompute_lab.strategies.budget.probe import (
    AUTOCAST_ON_META,
    CPU_SDPA_FLOPS,
    TOY_AUTOCAST,
    Measured,
    Price,
    Probed,
    kept_weight_copies,
    measure_step,
    probe,
    probe_model,
)
from recompute_lab.strategies.budget.solver import (
    cheapest_within,
    cost_key,
    pareto_plans,
    undominated,
)
from recompute_lab.strategies.wrap import RngStateHook

__all__ = [
    "BudgetConfig",
    "Objective",
    "apply_budget",
    "solve",
    "resolve_budget",
    "Option",
    "apply_option",
    "block_options",
    "CPU_SDPA_FLOPS",
    "Measured",
    "Price",
    "Probed",
    "measure_step",
    "probe",
    "probe_model",
    "AUTOCAST_ON_META",
    "TOY_AUTOCAST",
    "kept_weight_copies",
]

GB = 10**9
log = logging.getLogger(__name__)


def device_of(opts: BudgetConfig, shape: Shape) -> Device:
    """The device ``device_memory_gb`` describes (1e9 B, the card's memory as a whole), with the
    reserve recompute_lab.predict.devices keeps off every card the tool plans for (CUDA context,
    NCCL buffers, allocator fragmentation) when the step runs on CUDA; on CPU nothing is kept."""
    gb = opts.device_memory_gb
    reserve = Reserve() if shape.device == "cuda" else Reserve(0, 0, 0.0)
    return Device(int(gb * GB), f"{gb:g} GB", reserve, "strategy.device_memory_gb (1e9 B)")


def communicators(shape: Shape) -> int:
    """NCCL communicators this rank belongs to: one for data parallelism over several ranks."""
    return int(shape.parallel != "none" and shape.world_size > 1)


def resolve_budget(
    opts: BudgetConfig,
    none_bytes: int,
    n_params: int,
    shape: Shape,
    model_cfg=None,
    largest_region: int = 0,
) -> dict:
    """The activation budget in bytes and where it comes from (budget_bytes or device_memory_gb beat
    the fraction).

    device_memory_gb: the step's predicted peak (recompute_lab.predict.prediction, every phase for
    this rank at ``shape``, whose device says which kernels and optimizer run) plus the device's
    reserve (:func:`device_of`) must fit; the budget is the most activations for which it does,
    for a plan whose largest recompute region re-saves ``largest_region`` bytes, and
    ``binding_phase`` the phase that stops it. A phase that does not fit with nothing saved (the
    optimizer step of an unsharded 8B model on 141 GB) is a ConfigError naming it."""
    opts.check()
    given, gb = opts.budget_bytes, opts.device_memory_gb
    fraction = DEFAULT_FRACTION if opts.budget_fraction is None else opts.budget_fraction
    if given is not None:
        return {"bytes": int(given), "source": "budget_bytes"}
    if gb is None:
        return {
            "bytes": int(fraction * none_bytes),
            "source": f"budget_fraction={fraction} of none's {none_bytes} B",
        }
    device, groups = device_of(opts, shape), communicators(shape)
    limit = device.budget(groups)  # the largest step peak that fits with its reserve
    reserve = device.reserve.parts(limit, groups)
    room = prediction.activation_headroom(model_cfg, shape, limit, largest_region, n_params)
    state, bare = room["model_state"], room["without_activations"]
    kept = f"{reserve['total'] / GB:.2f} GB reserved" if reserve["total"] else "no reserve"
    if room["bytes"] is None:
        worst = room["binding"]
        alone = (
            f"; the model state alone ({state['total']} B = {n_params} params x "
            f"{state['bytes_per_param']} B) exceeds that"
            if state["total"] > limit
            else ""
        )
        raise ConfigError(
            f"the {worst} phase of the predicted step peaks at {bare[worst] / GB:.2f} GB "
            f"({bare[worst]} B) with no activations saved, above the {limit / GB:.2f} GB a step "
            f"may use of device_memory_gb={gb:g} ({kept}){alone} ({shape.precision}, "
            f"{shape.device} kernels and optimizer, parallel={shape.parallel}): no recomputation "
            "plan helps (shard the model state and optimizer, e.g. parallel=fsdp with a larger "
            "parallel.dp_size, or use more memory)"
        )
    binding = room["binding"]
    return {
        "bytes": room["bytes"],
        "source": f"device_memory_gb={gb:g} ({kept}): the step may peak at {limit} B; the "
        f"{binding} phase binds, at {bare[binding]} B without activations (predicted step peak, "
        f"{shape.device}, {shape.precision})",
        "device_bytes": device.total_bytes,
        "reserve": reserve,
        "peak_limit": limit,
        "binding_phase": binding,
        "largest_region": largest_region,
        "phases_without_activations": bare,
        "model_state_bytes": state["total"],
    }


PER_OP_REASON = "per-op / per-region plans recompute a subset of ops the module formula cannot see"


def reapply_budget(model: GPT, plan: Plan) -> Plan:
    """Replay a solved plan on another model of the same run (e.g. the meta replica FLOPs are
    counted on)."""
    plan = dataclasses.replace(
        plan,
        notes=[*plan.notes, "plan reused from the first probe of this run config in this process"],
        details=dict(plan.details),
    )
    hook = RngStateHook(model.tok_emb.weight.device)
    for i, name in enumerate(plan.details["chosen"]):
        apply_option(model, i, Option(**plan.details["option_kinds"][name]), hook)
    return plan


@register("budget", BudgetConfig, reapply=reapply_budget)
def apply_budget(model: GPT, opts: BudgetConfig, shape: Shape) -> Plan:
    """Probe the options at the run's shape, solve, and apply the plan."""
    resolve_budget(
        opts, 1, model.get_num_params(), shape, model.cfg
    )  # bad budgets fail before the probe
    return solve(model, opts, shape, probe_model(model, shape))


def solve(model: GPT, opts: BudgetConfig, shape: Shape, probed: Probed) -> Plan:
    """Solve for ``probed``'s prices (reusable across budgets) and apply the plan to ``model``.

    With ``device_memory_gb`` the plan's predicted step peak must fit. A phase may hold the largest
    recompute region's re-saved bytes beside the activations (predict_peak's recompute phase), so
    the budget depends on which options are allowed: the solve runs per re-save level r (options
    that re-save at most r, against the budget for r; only the largest r of each distinct budget)
    and keeps the cheapest fitting plan; that plan is then checked with the same peak function.
    """
    options, outside, prices = probed.options, probed.outside, probed.prices
    objective = Objective(str(opts.objective))
    device = model.tok_emb.weight.device
    rates = roofline_rates(device, probed.dtype) if objective == Objective.time else None
    costs = [cost_key(p, str(objective), rates) for p in prices]
    n = len(model.blocks)
    n_params = model.get_num_params()
    none_bytes = outside.bytes + n * prices[0].bytes
    resaved = resaved_bytes(prices)
    levels = (
        _levels(opts, none_bytes, n_params, shape, model.cfg, resaved)
        if opts.device_memory_gb is not None
        else [(max(resaved), resolve_budget(opts, none_bytes, n_params, shape, model.cfg))]
    )
    sizes = [p.bytes for p in prices]
    # Bytes some options keep once for all their blocks (Hugging Face layers' arguments held by
    # checkpoint regions): solved twice, with every option plus those bytes, and with only the
    # options that keep none.
    shared = max(p.shared for p in prices)
    solved = []
    for level, budget in levels:
        for extra in [shared, 0] if shared else [0]:
            allowed = [
                o
                for o in range(len(options))
                if resaved[o] <= level and (not prices[o].shared or extra)
            ]
            capacity = budget["bytes"] - outside.bytes - extra
            solved.append((*_frontier(n, allowed, sizes, costs, capacity), extra, budget))
    fitting = [c for c in solved if c[2] is not None]
    if not fitting:
        budget = solved[-1][4]  # with every option allowed
        smallest = min(outside.bytes + c[3] + c[1][0][0] for c in solved)
        raise ConfigError(
            f"no plan fits an activation budget of {budget['bytes']} B ({budget['source']}); the "
            f"smallest reachable is {smallest} B (full recomputation of every block; `none` saves "
            f"{none_bytes} B)"
        )
    keep, frontier, best, extra, budget = min(fitting, key=lambda c: (c[2][1], c[2][0] + c[3]))
    _, cost, counts = best
    # Most recomputation in the first blocks (their activations live longest, as Megatron's block
    # method).
    order = sorted(
        (keep[j] for j in range(len(keep)) for _ in range(counts[j])), key=lambda o: prices[o].bytes
    )
    saves = outside.bytes + extra + best[0]
    largest = max(resaved[o] for o in order)
    peak = prediction.step_peak(model.cfg, shape, saves, largest, n_params)
    fit = None
    if opts.device_memory_gb is not None:
        fit = device_of(opts, shape).fit(peak["total"], communicators(shape))
        if peak["total"] > budget["peak_limit"] or not fit["fits"]:
            # the solve's budget and the peak function disagree: a bug, not a configuration
            raise RuntimeError(
                f"budget plan's predicted peak {peak['total']} B ({peak['phase']}) exceeds the "
                f"{budget['peak_limit']} B it was solved for"
            )
    hook = RngStateHook(device)
    recomputed, chosen = [], []
    for i, o in enumerate(order):
        recomputed += apply_option(model, i, options[o], hook)
        chosen.append(options[o].name)
    per_op_blocks = [i for i, o in enumerate(order) if options[o].per_op]
    bound = f"{budget['binding_phase']} phase binds" if "binding_phase" in budget else "activations"
    log.info(
        "budget: plan saves %d of %d B allowed (%s; none: %d B), recomputes %d FLOPs per "
        "micro-batch; predicted step peak %d B (%s); %s",
        saves,
        budget["bytes"],
        bound,
        none_bytes,
        sum(prices[o].flops for o in order),
        peak["total"],
        peak["phase"],
        ", ".join(f"{chosen.count(c)} x {c}" for c in dict.fromkeys(chosen)),
    )
    details = {
        "chosen": chosen,
        "objective": str(objective),
        "budget": budget,
        "binding_phase": budget.get("binding_phase"),
        "predicted_peak": {k: peak[k] for k in ("total", "phase", "phases")},
        "device_fit": fit,
        "predicted_recompute_flops": sum(prices[o].flops for o in order),
        "cost": list(cost),
        "predicted_pointwise_bytes": sum(prices[o].pointwise_bytes for o in order),
        "none_activation_bytes": none_bytes,
        "outside_blocks_bytes": outside.bytes,
        "shared_bytes": extra,
        "option_prices": {
            options[o].name: dataclasses.asdict(prices[o]) for o in sorted(set(order))
        },
        "roofline": rates,
        "pareto_points": len(frontier),
        "undominated_options": [options[o].name for o in keep],
        "op_level_blocks": per_op_blocks,
        "option_kinds": {options[o].name: dataclasses.asdict(options[o]) for o in set(order)},
    }
    fits = (
        f"whose predicted step peak fits {budget['peak_limit']} B of the device's "
        f"{budget['device_bytes']} B ({budget['binding_phase']} phase binds: {budget['bytes']} B "
        "of activations)"
        if "device_bytes" in budget
        else f"whose saved activations fit {budget['bytes']} B"
    )
    return Plan(
        "budget",
        f"cheapest per-block plan ({objective}) {fits}, solved exactly over the probed options",
        recomputed=recomputed,
        saved=["per block, what its chosen option keeps (see chosen and option_prices)"],
        activation_reason="strategy 'budget': a solver's per-op plan",
        flops_reason=PER_OP_REASON if per_op_blocks else None,
        predicted_activation_bytes=saves,
        predicted_largest_region=largest,
        details=details,
        notes=[
            f"probe: {probed.batch}x{probed.seq} tokens, {_dtypes(probed)} one-block replicas on "
            f"{device.type}; FLOPs and bytes per micro-batch"
        ],
        warnings=list(probed.warnings),
    )


def _levels(opts, none_bytes, n_params, shape, model_cfg, resaved) -> list[tuple[int, dict]]:
    """(re-save level, its device-memory budget) for the levels worth a solve: a level whose
    recompute phase does not fit with nothing saved is dropped (level 0 always fits:
    apply_budget checked it), and of levels with the same budget only the largest is kept (it
    allows a superset of the options for the same bytes)."""
    out: list[tuple[int, dict]] = []
    for level in sorted(set(resaved)):
        try:
            budget = resolve_budget(opts, none_bytes, n_params, shape, model_cfg, level)
        except ConfigError:
            if level == 0:
                raise
            break  # budgets only shrink as the level grows
        if out and out[-1][1]["bytes"] == budget["bytes"]:
            out.pop()
        out.append((level, budget))
    return out


def resaved_bytes(prices: list[Price]) -> list[int]:
    """Per option, the bytes a block run that way re-saves while its recomputation runs in backward:
    what `none` saves in the block less what the option keeps (0 for `none`, options[0])."""
    return [0] + [max(prices[0].bytes - p.bytes, 0) for p in prices[1:]]


def _frontier(
    n: int, allowed: list[int], sizes: list[int], costs: list[tuple], capacity: int
) -> tuple:
    """(options kept, Pareto frontier of n-block plans over them, the cheapest plan within
    ``capacity`` or None);
    the frontier's option counts index the kept options."""
    keep = [
        allowed[j] for j in undominated([sizes[o] for o in allowed], [costs[o] for o in allowed])
    ]
    frontier = pareto_plans(n, [sizes[o] for o in keep], [costs[o] for o in keep])
    return keep, frontier, cheapest_within(frontier, capacity)


def _dtypes(probed: Probed) -> str:
    name = str(probed.param_dtype or probed.dtype).replace("torch.", "")
    return (
        f"{name} (autocast {str(probed.autocast).replace('torch.', '')})"
        if probed.autocast
        else name
    )

"""The ``budget`` strategy: the cheapest per-block recomputation plan whose saved activations fit a
memory budget.

torch.compile's ``activation_memory_budget`` (and torchtitan's ``memory_budget`` built on it) solve
this for
compiled graphs only. Here it is done in eager mode, over options built from the existing wrapping
helpers
(``options``), priced by one-block probes on the model's own device (``probe``), solved exactly
(``solver``).

Budget: ``budget_bytes``, or ``device_memory_gb`` (1e9 bytes; minus model state per
recompute_lab.predict.theory), or
``budget_fraction`` of ``none``'s probed activation bytes (the default 0.5). Options are priced in
the run's
precision (autocast included: its fp32 residual inputs and bf16 weight copies count), exactly on CPU
and CUDA;
on the meta device autocast cannot run, so there the prices are upper bounds and the plan carries a
warning.
Saved-activation bytes are what is planned; the transient memory of backward (one block's recomputed
activations, gradients) is not.
Out of scope: block groups (layers uniform, sqrt) save one input per group and so reach below full
recomputation; the smallest budget this planner reaches is that of full recomputation.
"""

from __future__ import annotations

import dataclasses
import logging

from recompute_lab.predict import prediction
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


def resolve_budget(
    opts: BudgetConfig, none_bytes: int, n_params: int, shape: Shape, model_cfg=None
) -> dict:
    """The activation budget in bytes and where it comes from (budget_bytes or device_memory_gb beat
    the fraction).
    device_memory_gb: minus the model state of recompute_lab.predict.prediction (``model_cfg``: the
    model's)."""
    opts.check()
    given, gb = opts.budget_bytes, opts.device_memory_gb
    fraction = DEFAULT_FRACTION if opts.budget_fraction is None else opts.budget_fraction
    if given is not None:
        return {"bytes": int(given), "source": "budget_bytes"}
    if gb is not None:
        state = prediction.model_state(model_cfg, shape, n_params)
        left = int(gb * GB) - state["total"]
        if left <= 0:
            raise ConfigError(
                f"model state alone ({state['total']} B = {n_params} params x "
                f"{state['bytes_per_param']} "
                f"B, {shape.precision}) exceeds device_memory_gb={gb}: no recomputation plan helps "
                "(shard the model state, e.g. FSDP/ZeRO, or use more memory)"
            )
        return {
            "bytes": left,
            "source": f"device_memory_gb={gb} minus model state {state['total']} B "
            f"({state['bytes_per_param']} B/param, {shape.precision})",
            "model_state_bytes": state["total"],
        }
    return {
        "bytes": int(fraction * none_bytes),
        "source": f"budget_fraction={fraction} of none's {none_bytes} B",
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
    """Solve for ``probed``'s prices (reusable across budgets) and apply the plan to ``model``."""
    options, outside, prices = probed.options, probed.outside, probed.prices
    objective = Objective(str(opts.objective))
    device = model.tok_emb.weight.device
    rates = roofline_rates(device, probed.dtype) if objective == Objective.time else None
    costs = [cost_key(p, str(objective), rates) for p in prices]
    n = len(model.blocks)
    none_bytes = outside.bytes + n * prices[0].bytes
    budget = resolve_budget(opts, none_bytes, model.get_num_params(), shape, model.cfg)
    sizes = [p.bytes for p in prices]
    # Bytes some options keep once for all their blocks (Hugging Face layers' arguments held by
    # checkpoint
    # regions): solved twice, with every option plus those bytes, and with only the options that
    # keep none.
    shared = max(p.shared for p in prices)
    solved = [
        _frontier(
            n,
            [o for o in range(len(options)) if not prices[o].shared or extra],
            sizes,
            costs,
            budget["bytes"] - outside.bytes - extra,
        )
        + (extra,)
        for extra in ([shared, 0] if shared else [0])
    ]
    fitting = [c for c in solved if c[2] is not None]
    if not fitting:
        smallest = min(outside.bytes + extra + frontier[0][0] for _, frontier, _, extra in solved)
        raise ConfigError(
            f"no plan fits an activation budget of {budget['bytes']} B ({budget['source']}); the "
            f"smallest reachable is {smallest} B (full recomputation of every block; `none` saves "
            f"{none_bytes} B)"
        )
    keep, frontier, best, extra = min(fitting, key=lambda c: (c[2][1], c[2][0] + c[3]))
    _, cost, counts = best
    # Most recomputation in the first blocks (their activations live longest, as Megatron's block
    # method).
    order = sorted(
        (keep[j] for j in range(len(keep)) for _ in range(counts[j])), key=lambda o: prices[o].bytes
    )
    hook = RngStateHook(device)
    recomputed, chosen = [], []
    for i, o in enumerate(order):
        recomputed += apply_option(model, i, options[o], hook)
        chosen.append(options[o].name)
    per_op_blocks = [i for i, o in enumerate(order) if options[o].per_op]
    log.info(
        "budget: plan saves %d of %d B allowed (none: %d B), recomputes %d FLOPs per micro-batch; "
        "%s",
        outside.bytes + best[0],
        budget["bytes"],
        none_bytes,
        sum(prices[o].flops for o in order),
        ", ".join(f"{chosen.count(c)} x {c}" for c in dict.fromkeys(chosen)),
    )
    details = {
        "chosen": chosen,
        "objective": str(objective),
        "budget": budget,
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
    return Plan(
        "budget",
        f"cheapest per-block plan ({objective}) whose saved activations fit {budget['bytes']} B, "
        "solved exactly over the probed options",
        recomputed=recomputed,
        saved=["per block, what its chosen option keeps (see chosen and option_prices)"],
        activation_reason="strategy 'budget': a solver's per-op plan",
        flops_reason=PER_OP_REASON if per_op_blocks else None,
        predicted_activation_bytes=outside.bytes + extra + best[0],
        details=details,
        notes=[
            f"probe: {probed.batch}x{probed.seq} tokens, {_dtypes(probed)} one-block replicas on "
            f"{device.type}; FLOPs and bytes per micro-batch"
        ],
        warnings=list(probed.warnings),
    )


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

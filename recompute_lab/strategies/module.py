"""Module-level strategies: none, full, selective, layers, sqrt. Whole modules or block groups are
checkpoints.

A checkpointed module keeps only its inputs and reruns its forward in backward
(recompute_lab.strategies.wrap).
Anchors: torchtitan ``mode=full`` and ``selective_ac_option=N``; Megatron-LM
``--recompute-granularity full |
selective``, ``--recompute-modules``, ``--recompute-method uniform | block``; Chen et al. 2016
(sqrt).

Layer: strategies.
"""

from __future__ import annotations

from recompute_lab.config import StrategyConfig
from recompute_lab.config.strategies import (
    LayersConfig,
    SelectiveConfig,
    layers_label,  # noqa: F401
    selective_label,
)
from recompute_lab.model.gpt import GPT
from recompute_lab.predict.module_plans import (  # noqa: F401  (SELECTIVE_MODULES re-exported)
    SELECTIVE_MODULES,
    full_plan,
    group_plan,
    layers_plan,
    none_plan,
    selective_plan,
    sqrt_groups,
    sqrt_plan,
)
from recompute_lab.strategies.base import Plan, Shape, part_modules, register
from recompute_lab.strategies.wrap import checkpoint_groups, checkpoint_module

# Each Plan is made from the options and the depth alone (recompute_lab.predict.module_plans, which
# estimate uses without a model); applying it wraps exactly the modules it names.


@register("none")
def apply_none(model: GPT, opts: StrategyConfig, shape: Shape) -> Plan:
    return none_plan()


@register("full")
def apply_full(model: GPT, opts: StrategyConfig, shape: Shape) -> Plan:
    for block in model.blocks:
        checkpoint_module(block)
    return full_plan(len(model.blocks))


@register("selective", SelectiveConfig, needs_attention=True, label=selective_label)
def apply_selective(model: GPT, opts: SelectiveConfig, shape: Shape) -> Plan:
    # a Hugging Face model names the parts through its family's map
    plan = selective_plan(
        opts, len(model.blocks), lambda part: part_modules(model, part, "selective")
    )
    for name in plan.recomputed:  # blocks.{i}.{part}
        _, i, rel = name.split(".", 2)
        checkpoint_module(model.blocks[int(i)].get_submodule(rel))
    return plan


@register("layers", LayersConfig, label=layers_label)
def apply_layers(model: GPT, opts: LayersConfig, shape: Shape) -> Plan:
    plan = layers_plan(opts, len(model.blocks))
    checkpoint_groups(model, plan.block_groups)
    return plan


@register("sqrt")
def apply_sqrt(model: GPT, opts: StrategyConfig, shape: Shape) -> Plan:
    plan = sqrt_plan(len(model.blocks))
    checkpoint_groups(model, plan.block_groups)
    return plan


__all__ = ["group_plan", "sqrt_groups"]

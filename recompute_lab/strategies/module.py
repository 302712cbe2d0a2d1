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

import math

from recompute_lab.config import ConfigError, StrategyConfig
from recompute_lab.config.strategies import (
    LayerMethod,
    LayersConfig,
    SelectiveConfig,
    layers_label,  # noqa: F401
    selective_label,
)
from recompute_lab.model.gpt import GPT
from recompute_lab.strategies.base import (
    Plan,
    Shape,
    block_names,
    check_names,
    check_range,
    part_modules,
    register,
)
from recompute_lab.strategies.wrap import checkpoint_groups, checkpoint_module, chunks


@register("none")
def apply_none(model: GPT, opts: StrategyConfig, shape: Shape) -> Plan:
    return Plan(
        "none", "every activation saved for backward; nothing recomputed", saved=["everything"]
    )


@register("full")
def apply_full(model: GPT, opts: StrategyConfig, shape: Shape) -> Plan:
    for block in model.blocks:
        checkpoint_module(block)
    return Plan(
        "full",
        "each block keeps only its input; the whole block's forward reruns in backward",
        recomputed=block_names(model),
        saved=["block inputs"],
    )


# selective: Megatron's recompute_modules. Each option names the block parts it checkpoints
# (recompute_lab.model.gpt's
# own submodule names; a Hugging Face family maps each part to its modules,
# recompute_lab.config.hf_families).
SELECTIVE_MODULES: dict[str, tuple[str, ...]] = {
    "core_attn": ("attn.core",),  # QK^T, mask, softmax, dropout, xV (or the one SDPA call)
    "attn": ("attn",),  # the whole attention sublayer: qkv, core, out projection, dropout
    "mlp": ("mlp",),  # fc, activation, proj, dropout
    "norm": (
        "norm1",
        "norm2",
    ),  # the norms: frees mean/rstd only; the next Linear still saves their output
}


@register("selective", SelectiveConfig, needs_attention=True, label=selective_label)
def apply_selective(model: GPT, opts: SelectiveConfig, shape: Shape) -> Plan:
    chosen = check_names("selective module", list(opts.modules), list(SELECTIVE_MODULES))
    if not chosen:
        raise ConfigError(f"strategy.modules is empty; choose from {', '.join(SELECTIVE_MODULES)}")
    notes = []
    if "attn" in chosen and "core_attn" in chosen:
        chosen.remove(
            "core_attn"
        )  # already inside the recomputed attention sublayer; nesting would rerun it twice
        notes.append(
            "core_attn is part of attn: checkpointed once, as part of the attention sublayer"
        )
    rel = [
        r
        for m in chosen
        for part in SELECTIVE_MODULES[m]
        for r in part_modules(model, part, "selective")
    ]
    recomputed = []
    for i, block in enumerate(model.blocks):
        for r in rel:
            checkpoint_module(block.get_submodule(r))
            recomputed.append(f"blocks.{i}.{r}")
    return Plan(
        "selective",
        f"per block, {', '.join(rel)} keep only their inputs and rerun in backward "
        "(Megatron selective recomputation)",
        recomputed=recomputed,
        notes=notes,
        details={"modules": chosen},
        saved=[
            "every activation outside the recomputed modules",
            "the inputs of the recomputed modules",
        ],
    )


def group_plan(name: str, groups: list[list[int]], description: str, **details) -> Plan:
    return Plan(
        name,
        description,
        recomputed=[f"blocks.{i}" for g in groups for i in g],
        block_groups=groups,
        saved=[
            "inputs of each checkpoint region",
            "every activation of blocks outside the regions",
        ],
        details=details,
    )


@register("layers", LayersConfig, label=layers_label)
def apply_layers(model: GPT, opts: LayersConfig, shape: Shape) -> Plan:
    n = len(model.blocks)
    method = LayerMethod(str(opts.method))
    if method == LayerMethod.every:
        check_range("every", opts.every, n)
        # torchtitan counts blocks from 1 and checkpoints those whose count is a multiple of N.
        groups = [[i] for i in range(n) if (i + 1) % opts.every == 0]
        what = (
            f"every {opts.every}-th block checkpointed on its own (torchtitan "
            f"selective_ac_option={opts.every})"
        )
    else:
        k = opts.num_layers
        check_range("num_layers", k, n)
        if method == LayerMethod.uniform:
            groups = chunks(n, k)
            what = (
                f"chunks of {k} consecutive blocks, each one checkpoint region (Megatron uniform)"
            )
        else:
            groups = [[i] for i in range(k)]
            what = f"only the first {k} blocks checkpointed, each on its own (Megatron block)"
    checkpoint_groups(model, groups)
    return group_plan(
        "layers", groups, what, method=str(method), num_layers=opts.num_layers, every=opts.every
    )


def sqrt_groups(n_layer: int) -> list[list[int]]:
    """Chen et al. 2016: segments of k ~ sqrt(L) blocks keep L/k segment inputs + one segment's
    activations."""
    return chunks(n_layer, max(1, round(math.sqrt(n_layer))))


@register("sqrt")
def apply_sqrt(model: GPT, opts: StrategyConfig, shape: Shape) -> Plan:
    groups = sqrt_groups(len(model.blocks))
    checkpoint_groups(model, groups)
    return group_plan(
        "sqrt",
        groups,
        f"{len(groups)} segments of ~sqrt({len(model.blocks)}) = {len(groups[0])} "
        "blocks, each one checkpoint region (Chen et al. 2016)",
    )

"""What a module-level strategy (none, full, selective, layers, sqrt) saves and recomputes, from its
options and the model's depth alone: the Plan that recompute_lab.strategies.module applies to a
model, made here without one.

recompute_lab.strategies.module builds its Plan with these functions and then wraps the modules the
Plan names, so a plan made without a model is the applied one by construction. ``estimate`` uses
them to answer from the theory without importing torch or building a meta replica (issue 29: an
answer in under 2 s); the meta count stays behind ``estimate.cross_check=true``.

Layer: predict (no torch).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from recompute_lab.config import ConfigError
from recompute_lab.config.plan import Plan
from recompute_lab.config.strategies import LayerMethod

# A block's named sub-regions (module names relative to recompute_lab.model.gpt's Block):
# torch_remat regions save or rerun them, and each is a part a strategy can name.
SUBREGIONS = (
    "norm1",
    "attn.qkv",
    "attn.core",
    "attn.out",
    "norm2",
    "mlp.fc",
    "mlp.act",
    "mlp.proj",
)

# The canonical parts of a transformer block, as recompute_lab.model.gpt's Block names its own
# submodules (a Hugging Face family maps each part to its modules:
# recompute_lab.config.hf_families).
BLOCK_PARTS: dict[str, tuple[str, ...]] = {p: (p,) for p in ("attn", "mlp", *SUBREGIONS)}

# selective: Megatron's recompute_modules. Each option names the block parts it checkpoints.
SELECTIVE_MODULES: dict[str, tuple[str, ...]] = {
    "core_attn": ("attn.core",),  # QK^T, mask, softmax, dropout, xV (or the one SDPA call)
    "attn": ("attn",),  # the whole attention sublayer: qkv, core, out projection, dropout
    "mlp": ("mlp",),  # fc, activation, proj, dropout
    # the norms: frees mean/rstd only; the next Linear still saves their output
    "norm": ("norm1", "norm2"),
}

# The strategies made here; the others (op, regions, offload, budget) need a model to plan.
MODULE_STRATEGIES = ("none", "full", "selective", "layers", "sqrt")


def check_names(kind: str, given: list[str], valid: list[str]) -> list[str]:
    """Reject names outside ``valid`` with a ConfigError that lists the valid ones; keep the order
    given."""
    unknown = [n for n in given if n not in valid]
    if unknown:
        raise ConfigError(
            f"unknown {kind} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
        )
    return list(dict.fromkeys(given))  # drop repeats


def check_range(key: str, value: int, n_layer: int) -> None:
    if not 1 <= value <= n_layer:
        raise ConfigError(
            f"strategy.{key}={value} is out of range for model.n_layer={n_layer}; "
            f"valid values: 1..{n_layer}"
        )


def chunks(n_layer: int, k: int) -> list[list[int]]:
    """Consecutive groups of k block indices (the last one may be shorter)."""
    return [list(range(s, min(s + k, n_layer))) for s in range(0, n_layer, k)]


def block_names(n_layer: int) -> list[str]:
    return [f"blocks.{i}" for i in range(n_layer)]


def none_plan() -> Plan:
    return Plan(
        "none", "every activation saved for backward; nothing recomputed", saved=["everything"]
    )


def full_plan(n_layer: int) -> Plan:
    return Plan(
        "full",
        "each block keeps only its input; the whole block's forward reruns in backward",
        recomputed=block_names(n_layer),
        saved=["block inputs"],
    )


def selective_plan(
    opts, n_layer: int, part_modules: Callable[[str], tuple[str, ...]] = BLOCK_PARTS.__getitem__
) -> Plan:
    """``part_modules``: the module names (relative to a block) that play a canonical part; the
    default is recompute_lab's own Block, a Hugging Face model passes its family's map."""
    chosen = check_names("selective module", list(opts.modules), list(SELECTIVE_MODULES))
    if not chosen:
        raise ConfigError(f"strategy.modules is empty; choose from {', '.join(SELECTIVE_MODULES)}")
    notes = []
    if "attn" in chosen and "core_attn" in chosen:
        # already inside the recomputed attention sublayer; nesting would rerun it twice
        chosen.remove("core_attn")
        notes.append(
            "core_attn is part of attn: checkpointed once, as part of the attention sublayer"
        )
    rel = [r for m in chosen for part in SELECTIVE_MODULES[m] for r in part_modules(part)]
    return Plan(
        "selective",
        f"per block, {', '.join(rel)} keep only their inputs and rerun in backward "
        "(Megatron selective recomputation)",
        recomputed=[f"blocks.{i}.{r}" for i in range(n_layer) for r in rel],
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


def layers_plan(opts, n_layer: int) -> Plan:
    method = LayerMethod(str(opts.method))
    if method == LayerMethod.every:
        check_range("every", opts.every, n_layer)
        # torchtitan counts blocks from 1 and checkpoints those whose count is a multiple of N.
        groups = [[i] for i in range(n_layer) if (i + 1) % opts.every == 0]
        what = (
            f"every {opts.every}-th block checkpointed on its own (torchtitan "
            f"selective_ac_option={opts.every})"
        )
    else:
        k = opts.num_layers
        check_range("num_layers", k, n_layer)
        if method == LayerMethod.uniform:
            groups = chunks(n_layer, k)
            what = (
                f"chunks of {k} consecutive blocks, each one checkpoint region (Megatron uniform)"
            )
        else:
            groups = [[i] for i in range(k)]
            what = f"only the first {k} blocks checkpointed, each on its own (Megatron block)"
    return group_plan(
        "layers", groups, what, method=str(method), num_layers=opts.num_layers, every=opts.every
    )


def sqrt_groups(n_layer: int) -> list[list[int]]:
    """Chen et al. 2016: segments of k ~ sqrt(L) blocks keep L/k segment inputs + one segment's
    activations."""
    return chunks(n_layer, max(1, round(math.sqrt(n_layer))))


def sqrt_plan(n_layer: int) -> Plan:
    groups = sqrt_groups(n_layer)
    return group_plan(
        "sqrt",
        groups,
        f"{len(groups)} segments of ~sqrt({n_layer}) = {len(groups[0])} "
        "blocks, each one checkpoint region (Chen et al. 2016)",
    )


def module_plan(opts, n_layer: int) -> Optional[Plan]:
    """The Plan of a module-level strategy on recompute_lab's own transformer (``opts``: typed
    strategy options) without a model; None for a strategy that needs one to plan."""
    name = str(opts.name)
    if name == "none":
        return none_plan()
    if name == "full":
        return full_plan(n_layer)
    if name == "selective":
        return selective_plan(opts, n_layer)
    if name == "layers":
        return layers_plan(opts, n_layer)
    if name == "sqrt":
        return sqrt_plan(n_layer)
    return None

"""The per-block options the budget planner chooses from, each expressed with the shared wrapping
helpers.

A block may run: checkpoint_module on any non-nested subset of {attn.core | attn, mlp.act | mlp,
norm1 + norm2}
(toy_mlp: any subset of its modules), the whole block checkpointed, an op-level SAC region (default
save list,
optionally every other matmul), or a torch_remat region with a save list. Parts are canonical names
(a Hugging Face
family plays them with its own modules, recompute_lab.config.hf_families; a family without a map
gets the block-level
options only).

Layer: strategies.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

from recompute_lab.model.gpt import GPT
from recompute_lab.strategies.base import is_hf, parts_of
from recompute_lab.strategies.wrap import (
    SUBREGIONS,
    RngStateHook,
    checkpoint_module,
    default_save_ops,
    region_name,
    remat_block,
    remat_subregion,
    sac_context_fn,
)


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to run a block. kind: modules (checkpoint_module on each), block, op (SAC), regions
    (torch_remat)."""

    name: str
    kind: str
    modules: tuple[str, ...] = ()  # modules: relative names; regions: the sub-regions saved
    every_other_mm: bool = False

    @property
    def per_op(self) -> bool:
        """Saves decided per aten op / per region: the module formulas of theory and flops do not
        apply."""
        return self.kind in ("op", "regions")


def block_options(model: GPT) -> list[Option]:
    """Every option the planner may give a block of ``model`` (nested checkpoints excluded: they
    rerun twice).
    The first is always "none"."""
    parts = parts_of(model)
    if not parts and not is_hf(model):  # toy_mlp: any subset of its three modules
        units = [n for n, _ in model.blocks[0].named_children()]
        subsets = [c for k in range(len(units) + 1) for c in itertools.combinations(units, k)]
        return [Option("+".join(c) or "none", "modules", c) for c in subsets] + [
            Option("block", "block")
        ]
    opts = []

    def have(*names: str) -> bool:
        return all(n in parts for n in names)

    # Norms go together (as selective's `norm`): each frees only its mean/rstd, (b, s) floats.
    for norms, attn, mlp in itertools.product(
        [c for c in ((), ("norm1", "norm2")) if have(*c)],
        [c for c in ((), ("attn.core",), ("attn",)) if have(*c)],
        [c for c in ((), ("mlp.act",), ("mlp",)) if have(*c)],
    ):
        mods = norms + attn + mlp
        opts.append(Option("+".join(mods) or "none", "modules", mods))
    opts += [
        Option("block", "block"),
        Option("op", "op"),
        Option("op-every-other-mm", "op", (), True),
    ]
    matmuls = ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj")
    if have(*matmuls, "attn.core"):
        opts.append(Option("regions:save-matmuls+core", "regions", (*matmuls, "attn.core")))
    if have(*matmuls):
        opts.append(Option("regions:save-matmuls", "regions", matmuls))
    return opts


def module_names(model: GPT, names: tuple[str, ...]) -> list[str]:
    """The modules (relative to a block) that an option's part names stand for (toy blocks: the
    names)."""
    parts = parts_of(model)
    return [rel for name in names for rel in parts.get(name, (name,))]


def apply_option(model: GPT, i: int, opt: Option, hook: Optional[RngStateHook] = None) -> list[str]:
    """Wrap block ``i`` as ``opt`` says; return the qualified names of the modules that now
    recompute."""
    block, parts = model.blocks[i], parts_of(model)
    if opt.kind == "modules":
        rels = module_names(model, opt.modules)
        for rel in rels:
            checkpoint_module(block.get_submodule(rel))
        return [f"blocks.{i}.{rel}" for rel in rels]
    if opt.kind == "block":
        checkpoint_module(block)
    elif opt.kind == "op":
        checkpoint_module(block, context_fn=sac_context_fn(default_save_ops(), opt.every_other_mm))
    else:  # regions: everything not in the save list (and dropout, adds, reshapes) reruns
        for r in SUBREGIONS:
            for rel in parts.get(r, ()):
                remat_subregion(
                    block.get_submodule(rel), region_name(r, parts[r], rel), save=r in opt.modules
                )
        remat_block(block, i, hook or RngStateHook(model.tok_emb.weight.device))
    return [f"blocks.{i}"]

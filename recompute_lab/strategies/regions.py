"""The ``regions`` strategy: explicit region-level rematerialization with torch_remat (PyPI
``torch-remat``,
Meta's library that torchtitan offers as its ``remat`` extra).

Each transformer block is one ``torch_remat.checkpoint`` region (everything in it recomputes by
default), and
its named sub-modules are ``torch_remat.region`` calls that are either saved (their autograd saves
stay on the
forward graph and the call is skipped on recompute) or recomputed, per ``strategy.save``:

    norm1, attn.qkv, attn.core, attn.out, norm2, mlp.fc, mlp.act, mlp.proj

Unnamed code between them (head split/merge, RoPE, dropout modules, residual adds) always reruns.
This can
express plans per-op SAC cannot, e.g. save mlp.fc but recompute mlp.proj, although both are addmm.
The
wrapping rules (saved outputs persisted for bare consumers, RNG state restored by a hook) live in
recompute_lab.strategies.wrap.

Layer: strategies.
"""

from __future__ import annotations


from recompute_lab.config.strategies import RegionsConfig
from recompute_lab.model.gpt import GPT
from recompute_lab.strategies.base import (
    Plan,
    Shape,
    check_names,
    is_hf,
    part_modules,
    parts_of,
    register,
)
from recompute_lab.strategies.wrap import (
    ALWAYS_RECOMPUTED,
    SUBREGIONS,
    RngStateHook,
    region_name,
    remat_block,
    remat_subregion,
)


@register("regions", RegionsConfig, needs_attention=True)
def apply_regions(model: GPT, opts: RegionsConfig, shape: Shape) -> Plan:
    save = check_names("region in strategy.save", list(opts.save), list(SUBREGIONS))
    for r in (
        save
    ):  # a Hugging Face family names its own modules for each part (one part may be several)
        part_modules(model, r, "regions")
    parts = parts_of(model)
    present = [r for r in SUBREGIONS if r in parts]
    recompute = [r for r in present if r not in save]
    hook = RngStateHook(model.tok_emb.weight.device)
    for i, block in enumerate(model.blocks):
        for r in present:
            for rel in parts[r]:
                remat_subregion(
                    block.get_submodule(rel), region_name(r, parts[r], rel), save=r in save
                )
        remat_block(block, i, hook)
    n = len(model.blocks)
    rerun = [rel for r in recompute for rel in parts[r]] + (
        [] if is_hf(model) else list(ALWAYS_RECOMPUTED)
    )
    return Plan(
        "regions",
        "each block is a torch_remat checkpoint region; the named sub-regions in `save` keep "
        "their activations and are skipped on recompute, the rest reruns in backward",
        recomputed=[f"blocks.{i}.{rel}" for i in range(n) for rel in rerun],
        saved=[
            "block inputs",
            *(f"blocks.*.{r} (its autograd saves and its output)" for r in save),
        ],
        block_groups=[[i] for i in range(n)],
        activation_reason="strategy 'regions': torch_remat regions save per their own policy",
        flops_reason="per-op / per-region plans recompute a subset of ops the module formula "
        "cannot see",
        details={"save": save, "recompute": recompute},
    )

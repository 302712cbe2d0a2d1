"""The ``op`` strategy: selective activation checkpointing (SAC) per aten op, as torchtitan's
``mode=selective,
selective_ac_option=op`` does it with torch.utils.checkpoint.create_selective_checkpoint_contexts.

Each block is one non-reentrant checkpoint region whose forward runs under a TorchDispatchMode: the
outputs of
the ops named in ``strategy.save_ops`` are cached for backward (MUST_SAVE); every other op is rerun
in backward
(PREFER_RECOMPUTE). The default save list is the matmuls and the attention kernels
(recompute_lab.strategies.wrap's
catalogue); what is recomputed is the pointwise tail (norms, GELU, softmax, masks, dropout, residual
adds).

Pitfalls handled here:
- ``nn.Linear`` with a bias dispatches ``aten.addmm`` (``aten.mm`` only without bias): a list
holding only ``mm``
  would recompute every projection of a biased model.
- Eager attention reaches the dispatcher as ``aten.bmm``; SDPA as one of the
``_scaled_dot_product_*`` kernels,
  or, with dropout on CPU, as its math path (bmm + softmax + dropout).
- The SAC cache holds its tensors outside saved_tensors_hooks: a hooks-based byte count does not see
them (the
  probe's resident-storage count does).

Layer: strategies.
"""

from __future__ import annotations

from typing import Optional

from recompute_lab.config import ConfigError
from recompute_lab.config.strategies import OpConfig
from recompute_lab.model.gpt import GPT
from recompute_lab.strategies.base import Plan, Shape, block_names, check_names, register
from recompute_lab.strategies.wrap import (
    ATTENTION_OPS,
    PROJECTION_OPS,
    available_ops,
    checkpoint_module,
    default_save_ops,
    sac_context_fn,
)


def normalize_op_name(name: str) -> str:
    """'torch.ops.aten.mm.default', 'aten.mm' and 'mm' all name aten.mm."""
    n = str(name).strip()
    for prefix in ("torch.ops.", "aten::", "aten."):
        n = n[len(prefix) :] if n.startswith(prefix) else n
    return n[: -len(".default")] if n.endswith(".default") else n


def resolve_save_ops(names: Optional[list[str]]) -> list[str]:
    if names is None:
        return default_save_ops()
    given = [normalize_op_name(n) for n in names]
    return check_names("op in strategy.save_ops", given, available_ops())


OP_REASON = "op-level selective checkpointing decides per aten op"


@register("op", OpConfig)
def apply_op(model: GPT, opts: OpConfig, shape: Shape) -> Plan:
    save_ops = resolve_save_ops(opts.save_ops)
    if not save_ops:
        raise ConfigError(
            "strategy.save_ops is empty (that is strategy=full); choose from "
            f"{', '.join(available_ops())}"
        )
    every_other = bool(opts.every_other_mm)
    if every_other and not set(save_ops) & set(PROJECTION_OPS):
        raise ConfigError("strategy.every_other_mm=true needs mm or addmm in strategy.save_ops")
    context_fn = sac_context_fn(save_ops, every_other)
    for block in model.blocks:
        checkpoint_module(block, context_fn=context_fn)
    notes = [
        "FlopCounterMode counts matmul/attention FLOPs only: the recomputed pointwise ops cost "
        "time, "
        "not counted FLOPs"
    ]
    if model.cfg.dropout > 0 and set(save_ops) & set(ATTENTION_OPS):
        notes.append(
            "attention kernels called with dropout_p > 0 draw random numbers; they are recomputed, "
            "not saved, so later dropout masks redraw identically"
        )
    saved = [
        f"outputs of aten.{n}"
        + (" (odd calls only)" if every_other and n in PROJECTION_OPS else "")
        for n in save_ops
    ]
    return Plan(
        "op",
        "each block is a selective-checkpoint region: listed ops' outputs are cached, every other "
        "op "
        "reruns in backward (torchtitan op SAC)"
        + ("; every second projection matmul is recomputed too" if every_other else ""),
        recomputed=block_names(model),
        saved=["block inputs", *saved],
        notes=notes,
        activation_reason=f"strategy 'op': {OP_REASON}",
        flops_reason="per-op / per-region plans recompute a subset of ops the module formula "
        "cannot see",
        details={"save_ops": [f"aten.{n}" for n in save_ops], "every_other_mm": every_other},
    )

"""The ``op`` strategy: selective activation checkpointing (SAC) per aten op, as torchtitan's ``mode=selective,
selective_ac_option=op`` does it with torch.utils.checkpoint.create_selective_checkpoint_contexts.

Each block is one non-reentrant checkpoint region whose forward runs under a TorchDispatchMode: the outputs of
the ops named in ``strategy.save_ops`` are cached for backward (MUST_SAVE); every other op is rerun in backward
(PREFER_RECOMPUTE). The default save list is the matmuls and the attention kernels, the expensive ops whose
outputs are cheap to keep relative to their FLOPs; what is recomputed is the pointwise tail (norms, GELU,
softmax, masks, dropout, residual adds).

Pitfalls handled here:
- ``nn.Linear`` with a bias dispatches ``aten.addmm`` (``aten.mm`` only without bias, or for 2-D inputs with
  bias=False): a list holding only ``mm`` would recompute every projection of a biased model.
- Eager attention reaches the dispatcher as ``aten.bmm`` (``matmul`` is decomposed before any dispatch mode
  sees it); SDPA as one of the ``_scaled_dot_product_*`` kernels, or, with dropout on CPU, as its math path
  (bmm + softmax + dropout).
- A saved op is skipped on recompute, so if it drew random numbers (an SDPA kernel with dropout_p > 0) every
  later dropout mask in the region would shift. Such calls are recomputed instead; the plan notes it.
- The SAC cache holds its tensors outside saved_tensors_hooks: a hooks-based byte count does not see them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from recompute_lab.config import ConfigError
from recompute_lab.model import GPT
from recompute_lab.strategies import Plan, block_names, check_names, checkpoint_module, option, register

# Ops whose outputs may be saved, by aten name (without the "aten." prefix and overload). Kept to ops that
# reach a dispatch mode in our models; random ops (bernoulli_, native_dropout) are deliberately absent.
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm")
ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable")
POINTWISE_OPS = ("_softmax", "_safe_softmax", "gelu", "silu", "native_layer_norm", "_fused_rms_norm")
# Counted as "an mm" by every_other_mm: the projections (Linear without / with bias).
PROJECTION_OPS = ("mm", "addmm")


def available_ops() -> list[str]:
    """Catalogue names that exist in this torch build (the SDPA kernels differ between builds)."""
    return [n for n in (*MATMUL_OPS, *ATTENTION_OPS, *POINTWISE_OPS) if hasattr(torch.ops.aten, n)]


def default_save_ops() -> list[str]:
    return [n for n in (*MATMUL_OPS[:3], *ATTENTION_OPS) if hasattr(torch.ops.aten, n)]


def normalize_op_name(name: str) -> str:
    """'torch.ops.aten.mm.default', 'aten.mm' and 'mm' all name aten.mm."""
    n = str(name).strip()
    for prefix in ("torch.ops.", "aten::", "aten."):
        n = n[len(prefix):] if n.startswith(prefix) else n
    return n[: -len(".default")] if n.endswith(".default") else n


def resolve_save_ops(names: list[str] | None) -> list[str]:
    if names is None:
        return default_save_ops()
    given = [normalize_op_name(n) for n in names]
    return check_names("op in strategy.save_ops", given, available_ops())


def draws_random(func: Any, args: tuple, kwargs: dict) -> bool:
    """True when this call consumes the RNG: seeded ops, except attention kernels called with dropout_p == 0."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            p = kwargs.get("dropout_p", args[i] if i < len(args) else arg.default_value)
            return bool(p)
    return True


def make_policy(save_ops: list[str], every_other_mm: bool) -> Callable[..., CheckpointPolicy]:
    """A fresh SAC policy for one region call (its matmul counter starts at zero in each block's forward).

    torch >= 2.9 asks the policy only during the original forward; the recompute replays the recorded
    decisions, so one counter per region call is exact.
    """
    packets = {getattr(torch.ops.aten, n) for n in save_ops}
    projections = {getattr(torch.ops.aten, n) for n in PROJECTION_OPS}
    count = {"mm": 0}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        packet = func.overloadpacket
        if packet not in packets or draws_random(func, args, kwargs):
            return CheckpointPolicy.PREFER_RECOMPUTE
        if every_other_mm and packet in projections:
            count["mm"] += 1
            if count["mm"] % 2 == 0:  # torchtitan: the 2nd, 4th, ... projection of a block is recomputed
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE

    return policy


def sac_context_fn(save_ops: list[str], every_other_mm: bool) -> Callable[[], tuple]:
    return lambda: create_selective_checkpoint_contexts(make_policy(save_ops, every_other_mm))


@register("op")
def apply_op(model: GPT, cfg: DictConfig) -> Plan:
    save_ops = resolve_save_ops(option(cfg, "save_ops", None))
    if not save_ops:
        raise ConfigError("strategy.save_ops is empty (that is strategy=full); choose from "
                          f"{', '.join(available_ops())}")
    every_other = bool(option(cfg, "every_other_mm", False))
    if every_other and not set(save_ops) & set(PROJECTION_OPS):
        raise ConfigError("strategy.every_other_mm=true needs mm or addmm in strategy.save_ops")
    context_fn = sac_context_fn(save_ops, every_other)
    for block in model.blocks:
        checkpoint_module(block, context_fn=context_fn)
    notes = ["FlopCounterMode counts matmul/attention FLOPs only: the recomputed pointwise ops cost time, "
             "not counted FLOPs"]
    if model.cfg.dropout > 0 and set(save_ops) & set(ATTENTION_OPS):
        notes.append("attention kernels called with dropout_p > 0 draw random numbers; they are recomputed, "
                     "not saved, so later dropout masks redraw identically")
    saved = [f"outputs of aten.{n}" for n in save_ops]
    if every_other:
        saved = [f"outputs of aten.{n}" + (" (odd calls only)" if n in PROJECTION_OPS else "") for n in save_ops]
    return {"name": "op", "save_ops": [f"aten.{n}" for n in save_ops], "every_other_mm": every_other,
            "recomputed": block_names(model), "saved": ["block inputs", *saved], "notes": notes,
            "description": "each block is a selective-checkpoint region: listed ops' outputs are cached, every "
                           "other op reruns in backward (torchtitan op SAC)"
                           + ("; every second projection matmul is recomputed too" if every_other else "")}

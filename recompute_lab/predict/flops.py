"""Predicted FLOPs per training step, and MFU / HFU from them (closed forms;
recompute_lab.measure.flops counts
the same with FlopCounterMode on a meta replica and re-exports these).

Layer: predict (no torch). Prediction (``predict_step_flops``): 2 FLOPs per multiply-add. Forward =
2 * tokens * (weights of every Linear,
the head included) + 4 * b * s^2 * d per layer for QK^T and xV (counted over the full s x s square,
as the
kernels and the counter do, not the causal half); backward = 2 x forward (grad of input and of
weight per
matmul). That is the 6N-per-token rule plus the attention term 12 * L * s * h per token (Kaplan et
al. 2020;
Korthikanti et al. 2022). A recomputed module adds one forward of itself: full recomputation of
every block adds
the blocks' forward, up to 8N vs 6N (+33%).
"""

from __future__ import annotations

from typing import Optional

from recompute_lab.config import Arch, Mlp
from recompute_lab.predict import theory


def module_forward_flops(cfg, batch: int, seq: int) -> dict[str, int]:
    """Predicted forward FLOPs of each addressable part of one block, for one micro-batch (b, s)."""
    m = cfg.model
    tokens = batch * seq
    if m.arch == Arch.toy_mlp:
        lin = 2 * tokens * m.d_model * m.d_model
        return {"linear1": lin, "linear2": lin, "relu": 0, "block": 2 * lin}
    hd = m.d_model // m.n_head
    kv = (m.n_kv_head or m.n_head) * hd
    fc_out = (2 if m.mlp == Mlp.swiglu else 1) * m.d_ff
    parts = {
        "attn.qkv": 2 * tokens * m.d_model * (m.d_model + 2 * kv),
        "attn.core": 4 * batch * seq * seq * m.d_model,  # QK^T and xV, full s x s square
        "attn.out": 2 * tokens * m.d_model * m.d_model,
        "mlp.fc": 2 * tokens * m.d_model * fc_out,
        "mlp.proj": 2 * tokens * m.d_ff * m.d_model,
        "norm1": 0,
        "norm2": 0,
        "mlp.act": 0,  # pointwise: no counted FLOPs
    }
    parts["attn"] = parts["attn.qkv"] + parts["attn.core"] + parts["attn.out"]
    parts["mlp"] = parts["mlp.fc"] + parts["mlp.proj"]
    parts["block"] = parts["attn"] + parts["mlp"]
    return parts


def recompute_flops(cfg, parts: dict[str, int], sub: str) -> int:
    """FLOPs a checkpoint of block part ``sub`` reruns in backward, early stop included (see module
    docstring)."""
    m = cfg.model
    if m.arch == Arch.toy_mlp:
        # linear2(relu(linear1(x))): linear2 saves its input (relu's output), so linear2 is never
        # rerun.
        return {"block": parts["linear1"], "linear1": parts["linear1"]}.get(sub, 0)
    dropout = m.dropout > 0
    half_core = parts["attn.core"] // 2  # QK^T reruns; xV keeps its inputs (scores, v) and does not
    rerun = {
        "attn.core": half_core,
        # attn.out saves its input (the core's output), so inside a larger region the whole core
        # reruns.
        "attn": parts["attn.qkv"] + parts["attn.core"] + (parts["attn.out"] if dropout else 0),
        "mlp": parts["mlp.fc"] + (parts["mlp.proj"] if dropout else 0),
    }
    # A lone Linear saves only its input, which is the region's input: nothing to rerun (attn.qkv,
    # mlp.fc, ...).
    rerun["block"] = parts["block"] - (0 if dropout else parts["mlp.proj"])
    return rerun.get(sub, 0)


def predict_step_flops(cfg, plan=None) -> dict:
    """Analytic FLOPs of one optimizer step; recompute from the plan's recomputed module names (or
    its reason why
    the module formula does not apply: ``plan.flops_reason``)."""
    m = cfg.model
    b, s, accum = cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.grad_accum
    ext = theory.external(
        m
    )  # a Hugging Face model: its family's parts play ours (recompute_lab.predict.hf_theory)
    why = ext.flops_reason(m) if ext is not None else None
    if why:
        return {
            "forward": None,
            "backward": None,
            "recompute": None,
            "recompute_unpredicted_reason": why,
        }
    parts = module_forward_flops(cfg, b, s)
    head = 2 * b * s * m.d_model * m.vocab_size
    forward = m.n_layer * parts["block"] + head
    recompute: Optional[int] = 0
    reason = None
    recomputed = list(plan.recomputed) if plan is not None else []
    groups = plan.block_groups if plan is not None else None
    if groups and recomputed and all(n.count(".") == 1 for n in recomputed):
        # Whole blocks checkpointed in groups (layers uniform, sqrt): early stop trims only the
        # group's last block.
        recomputed = []
        recompute = sum(
            (len(g) - 1) * parts["block"] + recompute_flops(cfg, parts, "block") for g in groups
        )
    for name in recomputed:
        pieces = name.split(".")
        sub = ".".join(pieces[2:]) or "block"
        if ext is not None and sub != "block":
            sub = ext.canonical(m, sub) or sub
        if pieces[0] != "blocks" or len(pieces) < 2 or sub not in parts:
            recompute, reason = None, f"no analytic FLOPs for recomputed module {name!r}"
            break
        recompute += recompute_flops(cfg, parts, sub)
    if plan is not None and plan.flops_reason and reason is None:
        recompute, reason = None, plan.flops_reason
    out = {
        "forward": forward * accum,
        "backward": 2 * forward * accum,
        "recompute": None if recompute is None else recompute * accum,
    }
    if reason:
        out["recompute_unpredicted_reason"] = reason
    return out


def utilization(
    model_flops: float, recompute_flops: float, step_s: float, peak: Optional[float]
) -> dict:
    """MFU counts model FLOPs only; HFU also counts the recomputed ones (Korthikanti et al.
    2022)."""
    if not peak or step_s <= 0:
        return {"mfu": None, "hfu": None}
    return {
        "mfu": model_flops / step_s / peak,
        "hfu": (model_flops + recompute_flops) / step_s / peak,
    }

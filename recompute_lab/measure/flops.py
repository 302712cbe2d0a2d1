"""FLOPs per training step — counted, predicted and turned into MFU/HFU — and the peak rates they divide by.

Counting (``count_step_flops``): torch.utils.flop_counter.FlopCounterMode over one forward and, separately, one
backward of a *meta-device replica* of the run (same config, same strategy, same micro-batch shape). Meta tensors
cost no memory or time and make the count independent of the kernel a device picks: on CPU the fused SDPA kernel
(aten._scaled_dot_product_flash_attention_for_cpu) has no FLOP formula and would count 0, while on meta SDPA
decomposes into the math path (bmm), whose FLOPs the fused kernels also perform. Recompute FLOPs are the
backward of the strategy's replica minus the backward of a replica with no recomputation: everything a
checkpoint reruns happens inside backward, so the difference is exactly the rerun forward work.

Non-reentrant torch.utils.checkpoint stops a recomputation early, as soon as every tensor that backward needs
has been rebuilt ("early stop", PyTorch's default). A region's trailing matmul whose output nobody saves is
therefore not rerun: with dropout 0 a block's last op with saved inputs is mlp.proj's input, so full
recomputation reruns the block *minus mlp.proj*; a checkpoint of the attention core alone (math path) never
reruns xV, whose inputs (scores, v) are what backward needs. ``recompute_flops`` predicts exactly this; with
dropout > 0 the dropout after mlp.proj needs its input, and the whole block reruns.

FlopCounterMode counts matmuls and attention only: recomputed pointwise ops (norms, activations, dropout) cost
time but no counted FLOPs; the time overhead measured by the benchmarks shows them.

Prediction (``predict_step_flops``): 2 FLOPs per multiply-add. Forward = 2 * tokens * (weights of every Linear,
the head included) + 4 * b * s^2 * d per layer for QK^T and xV (counted over the full s x s square, as the
kernels and the counter do, not the causal half); backward = 2 x forward (grad of input and of weight per
matmul). That is the 6N-per-token rule plus the attention term 12 * L * s * h per token (Kaplan et al. 2020;
Korthikanti et al. 2022). A recomputed module adds one forward of itself: full recomputation of every block adds
the blocks' forward, up to 8N vs 6N (+33%).
"""
from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from recompute_lab.predict import theory
from recompute_lab.config import Arch, Mlp
from recompute_lab.measure.hardware import peak_flops  # noqa: F401  (re-exported: MFU's denominator)
from recompute_lab.model.gpt import build_model
from recompute_lab.strategies import Plan, RunShape, apply_strategy

def _count(fn) -> tuple[int, dict[str, int]]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op, out


def count_model_flops(model: torch.nn.Module, batch: int, seq: int) -> tuple[int, int, dict, dict]:
    """(forward, backward, forward by op, backward by op) FLOPs of one loss step of ``model`` (any device)."""
    device = next(model.parameters()).device
    idx = torch.zeros(batch, seq, dtype=torch.long, device=device)
    fwd, fwd_ops, loss = _count(lambda: model(idx, idx))
    bwd, bwd_ops, _ = _count(loss.backward)
    return fwd, bwd, fwd_ops, bwd_ops


def _replica(cfg: DictConfig, dtype: torch.dtype, with_strategy: bool, plan: Optional[Plan] = None) -> torch.nn.Module:
    """A meta-device copy of the run's model, with its strategy applied (``plan`` given: replayed, not re-solved)."""
    model = build_model(cfg.model, device="meta", dtype=dtype).train()
    if with_strategy:
        apply_strategy(model, cfg.strategy, RunShape.of(cfg), reuse=plan)
    return model


def count_step_flops(cfg: DictConfig, param_dtype: torch.dtype = torch.float32, plan: Optional[Plan] = None) -> dict:
    """Counted FLOPs of one optimizer step (all micro-batches): forward, backward (model), recompute.

    ``plan``: the plan applied to the run's model (budget plans are replayed, not re-solved on meta); None applies
    the configured strategy afresh. Counted in the parameter dtype: autocast changes a matmul's dtype, not its FLOPs.
    """
    b, s, accum = cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.grad_accum
    f0, b0, _, _ = count_model_flops(_replica(cfg, param_dtype, with_strategy=False), b, s)
    f1, b1, f_ops, b_ops = count_model_flops(_replica(cfg, param_dtype, with_strategy=True, plan=plan), b, s)
    recompute = b1 - b0
    # f0 == f1 always (recomputation changes backward only); kept as a self-check in results.
    return {"forward": f1 * accum, "forward_without_strategy": f0 * accum, "backward": b0 * accum,
            "recompute": recompute * accum,
            "total": (f1 + b1) * accum, "forward_by_op": f_ops, "backward_by_op": b_ops,
            "method": "FlopCounterMode on a meta-device replica; recompute = backward(strategy) - backward(none)"}


def module_forward_flops(cfg: DictConfig, batch: int, seq: int) -> dict[str, int]:
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
        "norm1": 0, "norm2": 0, "mlp.act": 0,  # pointwise: no counted FLOPs
    }
    parts["attn"] = parts["attn.qkv"] + parts["attn.core"] + parts["attn.out"]
    parts["mlp"] = parts["mlp.fc"] + parts["mlp.proj"]
    parts["block"] = parts["attn"] + parts["mlp"]
    return parts


def recompute_flops(cfg: DictConfig, parts: dict[str, int], sub: str) -> int:
    """FLOPs a checkpoint of block part ``sub`` reruns in backward, early stop included (see module docstring)."""
    m = cfg.model
    if m.arch == Arch.toy_mlp:
        # linear2(relu(linear1(x))): linear2 saves its input (relu's output), so linear2 is never rerun.
        return {"block": parts["linear1"], "linear1": parts["linear1"]}.get(sub, 0)
    dropout = m.dropout > 0
    half_core = parts["attn.core"] // 2  # QK^T reruns; xV keeps its inputs (scores, v) and does not
    rerun = {
        "attn.core": half_core,
        # attn.out saves its input (the core's output), so inside a larger region the whole core reruns.
        "attn": parts["attn.qkv"] + parts["attn.core"] + (parts["attn.out"] if dropout else 0),
        "mlp": parts["mlp.fc"] + (parts["mlp.proj"] if dropout else 0),
    }
    # A lone Linear saves only its input, which is the region's input: nothing to rerun (attn.qkv, mlp.fc, ...).
    rerun["block"] = parts["block"] - (0 if dropout else parts["mlp.proj"])
    return rerun.get(sub, 0)


def predict_step_flops(cfg: DictConfig, plan: Optional[Plan] = None) -> dict:
    """Analytic FLOPs of one optimizer step; recompute from the plan's recomputed module names (or its reason why
    the module formula does not apply: ``plan.flops_reason``)."""
    m = cfg.model
    b, s, accum = cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.grad_accum
    ext = theory.external(m)  # a Hugging Face model: its family's parts play ours (recompute_lab.predict.hf_theory)
    why = ext.flops_reason(m) if ext is not None else None
    if why:
        return {"forward": None, "backward": None, "recompute": None, "recompute_unpredicted_reason": why}
    parts = module_forward_flops(cfg, b, s)
    head = 2 * b * s * m.d_model * m.vocab_size
    forward = m.n_layer * parts["block"] + head
    recompute: Optional[int] = 0
    reason = None
    recomputed = list(plan.recomputed) if plan is not None else []
    groups = plan.block_groups if plan is not None else None
    if groups and recomputed and all(n.count(".") == 1 for n in recomputed):
        # Whole blocks checkpointed in groups (layers uniform, sqrt): early stop trims only the group's last block.
        recomputed = []
        recompute = sum((len(g) - 1) * parts["block"] + recompute_flops(cfg, parts, "block") for g in groups)
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
    out = {"forward": forward * accum, "backward": 2 * forward * accum,
           "recompute": None if recompute is None else recompute * accum}
    if reason:
        out["recompute_unpredicted_reason"] = reason
    return out


def utilization(model_flops: float, recompute_flops: float, step_s: float, peak: Optional[float]) -> dict:
    """MFU counts model FLOPs only; HFU also counts the recomputed ones (Korthikanti et al. 2022)."""
    if not peak or step_s <= 0:
        return {"mfu": None, "hfu": None}
    return {"mfu": model_flops / step_s / peak, "hfu": (model_flops + recompute_flops) / step_s / peak}

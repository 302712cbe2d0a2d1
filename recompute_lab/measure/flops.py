"""FLOPs per training step — counted, predicted and turned into MFU/HFU — and the peak rates they
divide by.

Counting (``count_step_flops``): torch.utils.flop_counter.FlopCounterMode over one forward and,
separately, one
backward of a *meta-device replica* of the run (same config, same strategy, same micro-batch shape).
Meta tensors
cost no memory or time and make the count independent of the kernel a device picks: on CPU the fused
SDPA kernel
(aten._scaled_dot_product_flash_attention_for_cpu) has no FLOP formula and would count 0, while on
meta SDPA
decomposes into the math path (bmm), whose FLOPs the fused kernels also perform. Recompute FLOPs are
the
backward of the strategy's replica minus the backward of a replica with no recomputation: everything
a
checkpoint reruns happens inside backward, so the difference is exactly the rerun forward work.

Non-reentrant torch.utils.checkpoint stops a recomputation early, as soon as every tensor that
backward needs
has been rebuilt ("early stop", PyTorch's default). A region's trailing matmul whose output nobody
saves is
therefore not rerun: with dropout 0 a block's last op with saved inputs is mlp.proj's input, so full
recomputation reruns the block *minus mlp.proj*; a checkpoint of the attention core alone (math
path) never
reruns xV, whose inputs (scores, v) are what backward needs. ``recompute_flops`` predicts exactly
this; with
dropout > 0 the dropout after mlp.proj needs its input, and the whole block reruns.

FlopCounterMode counts matmuls and attention only: recomputed pointwise ops (norms, activations,
dropout) cost
time but no counted FLOPs; the time overhead measured by the benchmarks shows them.

Prediction: recompute_lab.predict.flops (closed forms, no torch), re-exported here.

Layer: measure.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from recompute_lab.config.spec import RunSpec
from recompute_lab.predict.flops import (
    module_forward_flops,
    predict_step_flops,
    recompute_flops,
    utilization,
)
from recompute_lab.measure.hardware import peak_flops
from recompute_lab.model.gpt import build_model, remember, replica_key
from recompute_lab.strategies import Plan, apply_strategy


# The counting here, and re-exported beside it: the closed forms (recompute_lab.predict.flops) and
# MFU's
# denominator (recompute_lab.measure.hardware.peak_flops).
__all__ = [
    "count_model_flops",
    "count_step_flops",
    "module_forward_flops",
    "peak_flops",
    "predict_step_flops",
    "recompute_flops",
    "utilization",
]


def _count(fn) -> tuple[int, dict[str, int]]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op, out


# count_step_flops's counts in this process, by what decides them: the replica's configuration
# (model.gpt.replica_key), the micro-batch and what was applied to it (strategy, replayed plan,
# shape). A sweep's jobs count a shape's strategy-free replica once, a repeated run nothing. Bounded
# like the budget's prices: an entry is two totals and two short per-op tables.
_COUNTED: dict[tuple, tuple[int, int, dict, dict]] = {}


def _counted(
    base: torch.nn.Module,
    replica: Callable[[], torch.nn.Module],
    batch: int,
    seq: int,
    applied: tuple,
) -> tuple:
    """count_model_flops of ``replica()``, or the earlier answer for the same configuration (read
    off ``base``, the strategy-free replica: a strategy never changes it), micro-batch and
    ``applied``; the replica is built only when counted. Copies: callers may change the tables."""
    key = (*replica_key(base), batch, seq, *map(repr, applied))
    fwd, bwd, fwd_ops, bwd_ops = remember(
        _COUNTED, key, lambda: count_model_flops(replica(), batch, seq)
    )
    return fwd, bwd, dict(fwd_ops), dict(bwd_ops)


def count_model_flops(model: torch.nn.Module, batch: int, seq: int) -> tuple[int, int, dict, dict]:
    """(forward, backward, forward by op, backward by op) FLOPs of one loss step of ``model`` (any
    device)."""
    device = next(model.parameters()).device
    idx = torch.zeros(batch, seq, dtype=torch.long, device=device)
    fwd, fwd_ops, loss = _count(lambda: model(idx, idx))
    bwd, bwd_ops, _ = _count(loss.backward)
    return fwd, bwd, fwd_ops, bwd_ops


def _replica(
    cfg: RunSpec, dtype: torch.dtype, with_strategy: bool, plan: Optional[Plan] = None
) -> torch.nn.Module:
    """A meta-device copy of the run's model, with its strategy applied (``plan`` given: replayed,
    not re-solved)."""
    model = build_model(cfg.model, device="meta", dtype=dtype).train()
    if with_strategy:
        apply_strategy(model, cfg.strategy, cfg.shape(), reuse=plan)
    return model


def count_step_flops(
    cfg: RunSpec, param_dtype: torch.dtype = torch.float32, plan: Optional[Plan] = None
) -> dict:
    """Counted FLOPs of one optimizer step (all micro-batches): forward, backward (model),
    recompute.

    ``plan``: the plan applied to the run's model (budget plans are replayed, not re-solved on
    meta); None applies
    the configured strategy afresh. Counted in the parameter dtype: autocast changes a matmul's
    dtype, not its FLOPs.
    """
    b, s, accum = cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.grad_accum
    base = _replica(cfg, param_dtype, with_strategy=False)
    f0, b0, _, _ = _counted(base, lambda: base, b, s, (param_dtype,))
    f1, b1, f_ops, b_ops = _counted(
        base,
        lambda: _replica(cfg, param_dtype, with_strategy=True, plan=plan),
        b,
        s,
        (param_dtype, cfg.strategy, plan, cfg.shape()),
    )
    recompute = b1 - b0
    # f0 == f1 always (recomputation changes backward only); kept as a self-check in results.
    return {
        "forward": f1 * accum,
        "forward_without_strategy": f0 * accum,
        "backward": b0 * accum,
        "recompute": recompute * accum,
        "total": (f1 + b1) * accum,
        "forward_by_op": f_ops,
        "backward_by_op": b_ops,
        "method": "FlopCounterMode on a meta-device replica; recompute = backward(strategy) - "
        "backward(none)",
    }

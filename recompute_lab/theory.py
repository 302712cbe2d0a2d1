"""Analytic memory and FLOP formulas, imported wherever a prediction is set beside a measurement.

Model state per parameter (Ultra-Scale Playbook, "Memory usage in Transformers"):
  fp32 training with Adam:           4 (params) + 4 (grads) + 8 (Adam m, v)                = 16 B
  bf16 with fp32 master weights:     2 (params) + 2 (grads) + 4 (master) + 8 (fp32 Adam)   = 16 B
  ... plus fp32 gradient accumulation buffers:                              + 4             = 20 B
The seed notebook's 12 B for fp32 forgets the gradients.
"""
from __future__ import annotations

# Bytes per parameter by kind, for each precision policy name.
MODEL_STATE_BYTES_PER_PARAM: dict[str, dict[str, int]] = {
    "fp32": {"params": 4, "grads": 4, "master": 0, "optimizer": 8},
    "bf16_autocast": {"params": 4, "grads": 4, "master": 0, "optimizer": 8},
    "bf16_master": {"params": 2, "grads": 2, "master": 4, "optimizer": 8},
    "bf16_master+fp32_grad_accum": {"params": 2, "grads": 6, "master": 4, "optimizer": 8},
}


def model_state_key(precision: str, fp32_grad_accum: bool = False) -> str:
    return f"{precision}+fp32_grad_accum" if fp32_grad_accum and precision == "bf16_master" else precision


def model_state_bytes(n_params: int, precision: str, fp32_grad_accum: bool = False) -> dict:
    """Predicted model-state bytes for ``n_params`` parameters: per kind, total and bytes per parameter."""
    per = MODEL_STATE_BYTES_PER_PARAM[model_state_key(precision, fp32_grad_accum)]
    by_kind = {k: v * n_params for k, v in per.items()}
    return {"per_param": by_kind, "total": sum(by_kind.values()), "bytes_per_param": sum(per.values())}


# FSDP with bf16_master: the sharded fp32 parameters ARE the master weights; FSDP's MixedPrecisionPolicy gathers
# bf16 copies for forward/backward (transient, freed after each block) and reduce-scatters gradients into fp32
# shards. Persistent state: fp32 params 4 + fp32 grads 4 + fp32 Adam 8 = 16 B, then divided over the ranks.
FSDP_BF16_MASTER_BYTES_PER_PARAM = {"params": 4, "grads": 4, "master": 0, "optimizer": 8}


def model_state_bytes_sharded(n_params: int, precision: str, fp32_grad_accum: bool = False,
                              parallel: str = "none", dp_size: int = 1) -> dict:
    """Predicted model-state bytes held by ONE rank of a ``dp_size``-way data-parallel run.

    none / ddp: every rank holds the whole state (DDP replicates it): 16N with Adam (ZeRO stage 0).
    fsdp:       ZeRO-3 shards params, grads and optimizer state: 16N / dp_size per rank (each tensor is split
                along dim 0; uneven splits pad, which this formula ignores).
    ``n_params`` is the whole model's count; ``per_param`` is bytes per rank by kind.
    """
    if parallel != "fsdp":
        return model_state_bytes(n_params, precision, fp32_grad_accum)
    per = (FSDP_BF16_MASTER_BYTES_PER_PARAM if precision == "bf16_master"
           else MODEL_STATE_BYTES_PER_PARAM[model_state_key(precision, fp32_grad_accum)])
    by_kind = {k: v * n_params // dp_size for k, v in per.items()}
    return {"per_param": by_kind, "total": sum(by_kind.values()), "bytes_per_param": sum(per.values()) / dp_size}

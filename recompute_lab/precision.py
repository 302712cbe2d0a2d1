"""Numeric precision policies: parameter dtype, autocast region and the optimizer that owns model state.

``fp32``          parameters, gradients and Adam moments in fp32: 4 + 4 + 8 = 16 bytes per parameter.
``bf16_autocast`` fp32 parameters, gradients and Adam state; matmuls run in bf16 under torch.autocast.

(The seed notebook counts fp32 as 12 B/param because it forgets the gradients; it is 16.)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from recompute_lab.config import ConfigError


@dataclass
class PrecisionPolicy:
    name: str
    param_dtype: torch.dtype
    autocast_dtype: Optional[torch.dtype] = None

    def autocast(self, device_type: str) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def build_optimizer(self, model: nn.Module, ocfg: DictConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(model, ocfg.weight_decay), lr=ocfg.lr, betas=tuple(ocfg.betas),
                                 eps=ocfg.eps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights), not biases or norm gains (nanoGPT's split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


POLICIES = {
    "fp32": lambda cfg: PrecisionPolicy("fp32", torch.float32),
    "bf16_autocast": lambda cfg: PrecisionPolicy("bf16_autocast", torch.float32, torch.bfloat16),
}


def make_precision(cfg: DictConfig) -> PrecisionPolicy:
    factory = POLICIES.get(cfg.name)
    if factory is None:
        raise ConfigError(f"unknown precision {cfg.name!r}; valid precisions: {', '.join(sorted(POLICIES))}")
    return factory(cfg)

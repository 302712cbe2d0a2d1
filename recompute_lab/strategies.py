"""Activation-recomputation strategies: each one rewires how modules run, never what they compute.

A strategy is a function ``(model, strategy_cfg) -> plan`` registered under its config name; the plan is a
JSON-able dict (what is recomputed, what stays saved) that goes into results.json so analysis can explain a
run. Recomputation is torch.utils.checkpoint with ``use_reentrant=False`` and ``preserve_rng_state=True`` so
dropout masks are redrawn identically and gradients equal those of ``none``. Modules are wrapped by replacing
their ``forward`` (not by inserting wrapper modules), so parameter names and state_dicts never change.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from omegaconf import DictConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from recompute_lab.config import ConfigError
from recompute_lab.model import GPT

Plan = dict[str, Any]
StrategyFn = Callable[[GPT, DictConfig], Plan]
STRATEGIES: dict[str, StrategyFn] = {}


def register(name: str) -> Callable[[StrategyFn], StrategyFn]:
    def deco(fn: StrategyFn) -> StrategyFn:
        STRATEGIES[name] = fn
        return fn
    return deco


def checkpoint_module(module: nn.Module, context_fn: Optional[Callable] = None) -> None:
    """Make ``module`` keep only its inputs for backward and recompute its forward there."""
    if getattr(module, "_recompute_wrapped", False):
        raise ValueError(f"{type(module).__name__} is already checkpointed")
    inner = module.forward
    kwargs: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": True}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn

    @functools.wraps(inner)
    def forward(*args: Any, **kw: Any) -> Any:
        return checkpoint(inner, *args, **kwargs, **kw)

    module.forward = forward  # instance attribute shadows the class method; nn.Module.__call__ finds it
    module._recompute_wrapped = True


def block_names(model: GPT) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


@register("none")
def apply_none(model: GPT, cfg: DictConfig) -> Plan:
    return {"name": "none", "recomputed": [], "saved": ["everything"],
            "description": "every activation saved for backward; nothing recomputed"}


@register("full")
def apply_full(model: GPT, cfg: DictConfig) -> Plan:
    for block in model.blocks:
        checkpoint_module(block)
    return {"name": "full", "recomputed": block_names(model), "saved": ["block inputs"],
            "description": "each block keeps only its input; the whole block's forward reruns in backward"}


def apply_strategy(model: GPT, cfg: DictConfig) -> Plan:
    """Apply the strategy named ``cfg.name`` to ``model`` in place and return its plan."""
    fn = STRATEGIES.get(cfg.name)
    if fn is None:
        raise ConfigError(f"unknown strategy {cfg.name!r}; valid strategies: {', '.join(sorted(STRATEGIES))}")
    return fn(model, cfg)

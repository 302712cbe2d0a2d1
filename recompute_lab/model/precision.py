"""Numeric precision policies: parameter dtype, autocast region and the optimizer that owns model
state.

Bytes of model state per parameter (Ultra-Scale Playbook, "Memory usage in Transformers";
theory.py):

``fp32``           fp32 params 4 + fp32 grads 4 + fp32 Adam m, v 8                          = 16 B
``bf16_autocast``  as fp32 (16 B); matmuls run in bf16 inside torch.autocast, the stored state is
                   all fp32
``bf16_master``    bf16 params 2 + bf16 grads 2 + fp32 master weights 4 + fp32 Adam m, v 8  = 16 B
  with ``fp32_grad_accum``: + an fp32 gradient accumulation buffer 4                       = 20 B

bf16_master runs the model itself in bf16 (no autocast) and keeps the numerically delicate part, the
optimizer, in fp32: :class:`MasterWeightAdamW` holds an fp32 copy of every parameter, steps it with
fp32
moments and writes the rounded result back into the bf16 parameter. Without the master copy, updates
smaller than half a bf16 ulp of the weight (8 mantissa bits: ~0.4% relative) would be rounded away.

(The seed notebook counts fp32 as 12 B/param because it forgets the gradients; it is 16.)

Layer: model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch
from torch import Tensor, nn
from torch.optim.adam import adam as adam_update

from recompute_lab.config import ConfigError, OptimizerConfig, PrecisionConfig


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over low-precision (bf16) parameters that steps fp32 master weights.

    Per parameter ``p`` (bf16), ``self.state[p]`` holds (keys measure.model_state_bytes counts by
    name):
      ``master``                  fp32 copy of p, the weights the update is applied to      4
                                  B/param
      ``exp_avg``, ``exp_avg_sq`` fp32 Adam moments                                        8 B/param
      ``grad_fp32``               only with fp32_grad_accum: fp32 sum of micro-batch grads  4
                                  B/param
      ``step``                    the 0-d step counter AdamW keeps
    The update is torch's own Adam kernel (decoupled weight decay) applied to the fp32 tensors, so
    with fp32
    inputs it is bit-identical to torch.optim.AdamW; afterwards ``p.copy_(master)`` rounds to
    nearest bf16.

    With ``fp32_grad_accum`` a post-accumulate-grad hook adds each micro-batch's bf16 gradient into
    ``grad_fp32`` and zeroes ``p.grad`` in place, so k micro-batches are summed in fp32 instead of
    in bf16.
    ``p.grad`` stays allocated as the bf16 buffer backward writes into: that is the Playbook's 2 + 4
    B of grads.
    """

    def __init__(self, params: Any, *, fp32_grad_accum: bool = False, **adamw_kwargs: Any):
        super().__init__(params, **adamw_kwargs)
        if any(
            g["amsgrad"] or g["fused"] or g["capturable"] or g["differentiable"]
            for g in self.param_groups
        ):
            raise ConfigError(
                "MasterWeightAdamW supports plain AdamW only (no amsgrad, fused, capturable, "
                "differentiable)"
            )
        self.fp32_grad_accum = fp32_grad_accum
        self._clip_coef: Optional[Tensor] = (
            None  # set by clip_grad_norm_, applied to fp32 grads in step()
        )
        self._hooks = (
            [
                p.register_post_accumulate_grad_hook(self._accumulate_fp32)
                for g in self.param_groups
                for p in g["params"]
            ]
            if fp32_grad_accum
            else []
        )

    # -- gradients
    # --------------------------------------------------------------------------------------
    def _accumulate_fp32(self, p: Tensor) -> None:
        state = self.state[p]
        if "grad_fp32" not in state:
            state["grad_fp32"] = torch.zeros_like(
                p, dtype=torch.float32, memory_format=torch.preserve_format
            )
        state["grad_fp32"].add_(p.grad)  # bf16 -> fp32 is exact; the sum is now kept in fp32
        p.grad.zero_()  # the next micro-batch lands here again

    def _step_grad(self, p: Tensor) -> Tensor:
        """The gradient this optimizer steps ``p`` with, in fp32 (the accumulation buffer or p.grad
        upcast)."""
        return self.state[p]["grad_fp32"] if self.fp32_grad_accum else p.grad.float()

    def _params_with_grad(self, group: dict) -> list[Tensor]:
        # p.grad is None exactly when p took no part in this step's backward (the hook never frees
        # it).
        return [p for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Global L2 norm of the fp32 step gradients; scale them to ``max_norm`` (as clip_grad_norm_
        does).

        The scale is applied in fp32 inside step(), so clipping never adds a bf16 rounding of its
        own.
        """
        grads = [self._step_grad(p) for g in self.param_groups for p in self._params_with_grad(g)]
        if not grads:
            return torch.zeros(())
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
        )
        self._clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for state in self.state.values():
            if "grad_fp32" in state:
                state["grad_fp32"].zero_()  # kept allocated: it is persistent state (4 B/param)
        self._clip_coef = None

    # -- the update
    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = self._params_with_grad(group)
            if not params:
                continue
            masters, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in params:
                state = self.state[p]
                if (
                    "master" not in state
                ):  # lazy, as AdamW creates its moments: fp32 copy of the bf16 weight
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["master"] = p.detach().to(
                        torch.float32, copy=True
                    )  # own storage even if p is fp32
                    state["exp_avg"] = torch.zeros_like(state["master"])
                    state["exp_avg_sq"] = torch.zeros_like(state["master"])
                g = self._step_grad(
                    p
                )  # a fresh fp32 copy, or the fp32 buffer zero_grad clears: scale in place
                if self._clip_coef is not None:
                    g.mul_(self._clip_coef.to(g.device))
                masters.append(state["master"])
                grads.append(g)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            adam_update(
                masters,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                decoupled_weight_decay=True,
            )
            for p, master in zip(params, masters):
                p.copy_(master)  # round to nearest bf16: the model computes with these
        self._clip_coef = None
        return loss

    # -- checkpoints
    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """AdamW's state dict with fp32 master weights and moments; grad_fp32 is per-step scratch,
        left out."""
        sd = super().state_dict()
        sd["state"] = {
            i: {k: v for k, v in s.items() if k != "grad_fp32"} for i, s in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim.Optimizer casts floating state to the parameter's dtype (bf16 here): that
        # would round
        # the master weights and moments. Load, then put back the saved fp32 tensors exactly.
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip(params, ids):
            for key, value in state_dict["state"].get(i, {}).items():
                if key != "step" and isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)


@dataclass
class PrecisionPolicy:
    name: str
    param_dtype: torch.dtype
    autocast_dtype: Optional[torch.dtype] = None
    master_weights: bool = (
        False  # fp32 master copy + fp32 Adam state in the optimizer (MasterWeightAdamW)
    )
    fp32_grad_accum: bool = (
        False  # micro-batch gradients summed in fp32 buffers (engine reads this)
    )

    def autocast(self, device_type: str) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def build_optimizer(self, model: nn.Module, ocfg: OptimizerConfig) -> torch.optim.Optimizer:
        groups = param_groups(model, ocfg.weight_decay)
        kwargs = {"lr": ocfg.lr, "betas": tuple(ocfg.betas), "eps": ocfg.eps}
        if self.master_weights:
            return MasterWeightAdamW(groups, fp32_grad_accum=self.fp32_grad_accum, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def clip_grad_norm(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float
    ) -> Tensor:
        """Clip the gradients the optimizer will step with (fp32 ones under master weights)."""
        if isinstance(optimizer, MasterWeightAdamW):
            return optimizer.clip_grad_norm_(max_norm)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights), not biases or norm gains (nanoGPT's split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


POLICIES = {
    "fp32": lambda cfg: PrecisionPolicy("fp32", torch.float32),
    "bf16_autocast": lambda cfg: PrecisionPolicy("bf16_autocast", torch.float32, torch.bfloat16),
    "bf16_master": lambda cfg: PrecisionPolicy(
        "bf16_master",
        torch.bfloat16,
        master_weights=True,
        fp32_grad_accum=bool(cfg.fp32_grad_accum),
    ),
}


def make_precision(cfg: PrecisionConfig) -> PrecisionPolicy:
    factory = POLICIES.get(cfg.name)
    if factory is None:
        raise ConfigError(
            f"unknown precision {cfg.name!r}; valid precisions: {', '.join(sorted(POLICIES))}"
        )
    if cfg.fp32_grad_accum and cfg.name != "bf16_master":
        raise ConfigError(
            f"precision.fp32_grad_accum=true needs precision=bf16_master (precision={cfg.name} "
            "already accumulates gradients in fp32)"
        )
    return factory(cfg)


def shape_dtypes(shape) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """(parameter dtype, autocast dtype or None) of a recompute_lab.config.spec.Shape's
    precision."""
    policy = make_precision(
        PrecisionConfig(name=shape.precision, fp32_grad_accum=shape.fp32_grad_accum)
    )
    return policy.param_dtype, policy.autocast_dtype

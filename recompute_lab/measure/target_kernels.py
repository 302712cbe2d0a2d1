"""Make a meta-device forward save what a target device's kernels save, for estimates without
memory.

On the meta device PyTorch runs the composite (decomposed) version of several ops, and those save
different
tensors than the kernels a real device picks. :class:`TargetKernels` is a TorchFunctionMode that
reroutes the
four ops where that matters to small autograd Functions whose forward allocates meta outputs and
saves exactly
the target kernel's set (from PyTorch's derivatives.yaml and kernel sources;
recompute_lab.predict.theory states the
same facts as terms). Their backward is never run: estimates do no backward.

  op                      target cuda                                     target cpu
  scaled_dot_product_attn flash (16-bit) / efficient (fp32): q, k, v,      flash (no dropout): q, k,
  v, output,
                          output, fp32 logsumexp (efficient: s padded     fp32 logsumexp; with
                          dropout the
                          to 32), philox seed + offset with dropout       composite math path (left
                          as is)
  dropout (p > 0)         bool mask                                       mask in the input dtype
                          (left as is)
  rms_norm                fused kernel: input + fp32 rstd                 composite (left as is)
  layer_norm (16-bit)     fp32 mean / rstd (left as is: meta does that)   mean / rstd in the input
                          dtype

Layer: measure, primitives (importable from every layer above config, predict and model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from recompute_lab.predict import theory


def _empty_bshd(q: torch.Tensor) -> torch.Tensor:
    """An attention output (b, h, s, d) laid out (b, s, h, d), as flash/efficient kernels write
    it."""
    b, h, s, d = q.shape
    return torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def _is_dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.transpose(1, 2).is_contiguous()


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, backend: str, dropout: float):
        b, h, s, _ = q.shape
        # flash (CPU and CUDA) allocates the output like q when q is dense, else (b, s, h, d);
        # efficient always
        # writes (b, s, h, d).
        out = torch.empty_like(q) if backend != "efficient" and _is_dense(q) else _empty_bshd(q)
        lse_s = math.ceil(s / 32) * 32 if backend == "efficient" else s
        lse = torch.empty(b, h, lse_s, dtype=torch.float32, device=q.device)
        saved = [q, k, v, out, lse]
        if dropout > 0 and backend in (
            "flash",
            "efficient",
        ):  # philox RNG state for the backward's mask
            seed = torch.empty(2 if backend == "flash" else (), dtype=torch.int64, device=q.device)
            saved += [seed, torch.empty((), dtype=torch.int64, device=q.device)]
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - estimates never run backward
        raise RuntimeError("TargetKernels emulates saved tensors for estimates; it has no backward")


class _CudaDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        ctx.save_for_backward(torch.empty(x.shape, dtype=torch.bool, device=x.device))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover
        raise RuntimeError("no backward for estimates")


class _Norm(torch.autograd.Function):
    """Saves the input and per-row statistics (``n_stats`` of them, dtype ``stat_dtype``)."""

    @staticmethod
    def forward(ctx, x, weight, n_stats: int, stat_dtype):
        # empty_like of a (..., 1) slice: a sequence-parallel DTensor input gives statistics sharded
        # like it
        stats = [torch.empty_like(x[..., :1], dtype=stat_dtype) for _ in range(n_stats)]
        ctx.save_for_backward(x, *stats)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover
        raise RuntimeError("no backward for estimates")


class TargetKernels(TorchFunctionMode):
    """Within this mode, meta-device ops save what ``target`` ("cuda" | "cpu") would save."""

    def __init__(self, target: str):
        super().__init__()
        if target not in ("cuda", "cpu"):
            raise ValueError(f"target must be cuda or cpu, got {target!r}")
        self.target = target
        self.used: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if self.target == "cuda":
                backend = "flash" if q.dtype in (torch.float16, torch.bfloat16) else "efficient"
            elif p == 0:
                backend = "cpu_flash"
            else:  # CPU with dropout: the composite math path, which meta runs too
                return func(*args, **kwargs)
            self.used.add(f"sdpa:{backend}")
            return _FusedAttention.apply(q, k, v, backend, p)
        if func is F.dropout and self.target == "cuda":
            x, p = args[0], kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if training and p > 0:
                self.used.add("dropout:bool_mask")
                return _CudaDropout.apply(x, p)
        if func is F.rms_norm and self.target == "cuda":
            self.used.add("rms_norm:fused")
            return _Norm.apply(
                args[0], kwargs.get("weight", args[2] if len(args) > 2 else None), 1, torch.float32
            )
        if (
            func is F.layer_norm
            and self.target == "cpu"
            and args[0].dtype in (torch.float16, torch.bfloat16)
        ):
            self.used.add("layer_norm:16bit_stats")
            return _Norm.apply(
                args[0], kwargs.get("weight", args[2] if len(args) > 2 else None), 2, args[0].dtype
            )
        return func(*args, **kwargs)


# What the estimate assumes of these kernels, in words, lives with the theory it qualifies.
assumptions = theory.kernel_assumptions

"""Measurements taken on a real (or meta) model: model-state bytes, allocator peaks, step timers.

Model-state bytes are counted from the tensors themselves (unique storages of parameters, their gradients
and the optimizer state), independently of recompute_lab.theory, so the two can be compared in tests.
Sharded tensors (FSDP2 DTensors) count what this rank holds: their local shard (a DTensor's own
untyped_storage() is an invalid wrapper storage, so the bytes are taken from ``to_local()``).
Optimizer-state convention: a state entry named ``master`` is a master weight, ``grad_fp32`` an fp32
gradient-accumulation buffer (counted with grads); 0-d entries (Adam's ``step`` counters) are not per-parameter
state and are reported apart.
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
from torch import Tensor, nn


def _local(t: Tensor) -> Tensor:
    """The tensor this process holds: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def _storage_key(t: Tensor) -> tuple:
    s = t.untyped_storage()
    # All meta tensors report data_ptr 0: tell their storages apart by the storage object itself.
    return (t.device.type, s._cdata if t.device.type == "meta" else s.data_ptr())


def unique_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once)."""
    seen: dict[tuple, int] = {}
    for t in map(_local, tensors):
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    master, grad_fp32, adam, scalars = [], [], [], []
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, v in state.items():
                if not isinstance(v, Tensor):
                    continue
                if v.dim() == 0:
                    scalars.append(v)
                elif key == "master":
                    master.append(v)
                elif key == "grad_fp32":
                    grad_fp32.append(v)
                else:
                    adam.append(v)
    per = {"params": unique_bytes(params), "grads": unique_bytes(grads) + unique_bytes(grad_fp32),
           "master": unique_bytes(master), "optimizer": unique_bytes(adam)}
    n = sum(p.numel() for p in {id(p): p for p in params}.values())
    return {"per_param": per, "total": sum(per.values()), "bytes_per_param": sum(per.values()) / max(n, 1),
            "optimizer_step_counters": unique_bytes(scalars), "dtypes": _dtypes(params, grads + grad_fp32, master, adam)}


def _dtypes(params, grads, master, adam) -> dict:
    def names(ts):
        return sorted({str(t.dtype).replace("torch.", "") for t in ts})
    return {"params": names(params), "grads": names(grads), "master": names(master), "optimizer": names(adam)}


class StepTimer:
    """Wall time of one step: CUDA events when on GPU (asynchronous kernels), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "StepTimer":
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


def cuda_peak_bytes(device: torch.device) -> dict | None:
    """Allocator peak since the last reset (CUDA only; on CPU the MemTracker path of measure applies)."""
    if device.type != "cuda":
        return None
    return {"allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device)}

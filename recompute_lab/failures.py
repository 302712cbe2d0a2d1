"""How a run ends when it does not end ``ok``: the exceptions that carry each status, SIGINT/SIGTERM handling,
and what was resident when CUDA ran out of memory.

recompute_lab.engine maps them to results.json's status: Diverged -> diverged, Interrupted / KeyboardInterrupt
-> interrupted, torch.OutOfMemoryError -> oom.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import torch


class Diverged(RuntimeError):
    """Non-finite loss or gradients (trainer.stop_on_nan)."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state after the last finished step is checkpointed."""


class SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (SLURM preemption sends SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._old: dict = {}

    def __enter__(self) -> "SignalFlag":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


_OOM_SEEN: dict = {}  # filled by the CUDA allocator's OOM observer at the moment of failure


def install_oom_observer() -> None:
    """Once per process on CUDA: record torch_remat's saved-tensor report when the allocator runs out.

    The report is taken inside the allocator callback, while the autograd graph that holds the saved tensors is
    still alive; by the time the exception reaches the engine the frames that owned it are gone.
    """
    if not torch.cuda.is_available() or _OOM_SEEN.get("installed"):
        return

    def observer(device: int, alloc: int, device_alloc: int, device_free: int) -> None:
        try:
            import torch_remat

            report = torch_remat.format_oom_saved_tensors_report()
        except Exception as e:  # a diagnosis aid: never mask the OOM itself
            report = f"unavailable ({type(e).__name__}: {e})"
        _OOM_SEEN.update(last={"request_bytes": alloc, "device_allocated": device_alloc,
                               "device_free": device_free, "saved_tensors_report": report})

    torch._C._cuda_attach_out_of_memory_observer(observer)
    _OOM_SEEN["installed"] = True


def oom_report() -> dict:
    """What was resident when memory ran out (CUDA): allocator figures and the saved-tensor report."""
    if not torch.cuda.is_available():
        return {}
    out = {"cuda_allocated": torch.cuda.memory_allocated(), "cuda_max_allocated": torch.cuda.max_memory_allocated()}
    out.update(_OOM_SEEN.pop("last", {}))
    return out

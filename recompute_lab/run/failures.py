"""How a run ends when it does not end ``ok``: the exceptions that carry each status, SIGINT/SIGTERM
handling,
and what was resident when CUDA ran out of memory.

recompute_lab.run.engine maps them to results.json's status: Diverged -> diverged, Interrupted /
KeyboardInterrupt
-> interrupted, torch.OutOfMemoryError -> oom.

Layer: run, primitives (importable from every layer above config, predict and model).
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


class SetupInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during setup. A BaseException, so no ``except Exception`` on the way (the
    probe's, W&B's)
    can swallow it."""


# The last SIGINT / SIGTERM this process received through a run's handler (its name): a sweep run
# in this process (Hydra's basic launcher) stops after the job it interrupted
# (recompute_lab.cli.train.run_job reads it).
RECEIVED: dict = {}


class SignalFlag:
    """SIGINT/SIGTERM handling for one run (SLURM preemption sends SIGTERM, then SIGKILL after its
    grace time).

    During setup (probe, FLOP count, budget planning: ``immediate`` true) a signal stops the run at
    once with
    Interrupted: there is nothing to save yet. Once training runs it becomes a flag the loop checks
    after each
    step, so the step finishes and a checkpoint is written. A second Ctrl-C stops at once and says
    which step the
    last checkpoint holds (``checkpointed_step``, kept up to date by the loop).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self.immediate = True
        self.closing = (
            False  # the final record is being written: note signals, never interrupt that
        )
        self.checkpointed_step: Optional[int] = None
        self.step: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> "SignalFlag":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        RECEIVED["signal"] = name
        if self.closing:
            self.received = self.received or name
            return
        if self.immediate:
            self.received = name
            raise SetupInterrupted(
                f"{name} during setup, before the first training step; nothing to checkpoint"
            )
        if self.received is not None and signum == signal.SIGINT:
            saved = (
                "no checkpoint was written"
                if self.checkpointed_step is None
                else f"the last checkpoint holds step {self.checkpointed_step}"
            )
            raise KeyboardInterrupt(
                f"second SIGINT: stopped at once during step {self.step}; {saved}, "
                "later steps are lost"
            )
        self.received = name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# Messages of allocation failures that reach Python as RuntimeError (CPU) rather than
# torch.OutOfMemoryError.
_CPU_OOM = (
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    "std::bad_alloc",
    "Cannot allocate memory",
)


def is_oom(exc: BaseException) -> bool:
    """Out of memory on any device: CUDA's OutOfMemoryError, Python's MemoryError, the CPU
    allocator's failures."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CPU_OOM)


_OOM_SEEN: dict = {}  # filled by the CUDA allocator's OOM observer at the moment of failure


def install_oom_observer() -> None:
    """Once per process on CUDA: record torch_remat's saved-tensor report when the allocator runs
    out.

    The report is taken inside the allocator callback, while the autograd graph that holds the saved
    tensors is
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
        _OOM_SEEN.update(
            last={
                "request_bytes": alloc,
                "device_allocated": device_alloc,
                "device_free": device_free,
                "saved_tensors_report": report,
            }
        )

    torch._C._cuda_attach_out_of_memory_observer(observer)
    _OOM_SEEN["installed"] = True


def oom_report() -> dict:
    """What was resident when memory ran out (CUDA): allocator figures and the saved-tensor
    report."""
    if not torch.cuda.is_available():
        return {}
    out = {
        "cuda_allocated": torch.cuda.memory_allocated(),
        "cuda_max_allocated": torch.cuda.max_memory_allocated(),
    }
    out.update(_OOM_SEEN.pop("last", {}))
    return out

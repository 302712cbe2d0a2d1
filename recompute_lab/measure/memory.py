"""Measurements taken on a real (or meta) model: model-state bytes, saved tensors, allocator peaks,
step timers.

Activation and peak bytes come from paths that share no code with recompute_lab.predict.theory nor
with each other
(recompute_lab.measure.probe runs them all on one probe step): :func:`saved_tensors`
(saved_tensors_hooks, storages
counted once), :func:`mem_tracker_step` (PyTorch's MemTracker, peak by category),
:func:`remat_saved_bytes`
(torch_remat's walk of the autograd graph from the loss) and the CUDA caching allocator's counters.

Model-state bytes are counted from the tensors themselves (unique storages of parameters, their
gradients
and the optimizer state), independently of recompute_lab.predict.theory, so the two can be compared
in tests.
Sharded tensors (FSDP2 DTensors) count what this rank holds: their local shard (a DTensor's own
untyped_storage() is an invalid wrapper storage, so the bytes are taken from ``to_local()``).
Optimizer-state convention: a state entry named ``master`` is a master weight, ``grad_fp32`` an fp32
gradient-accumulation buffer (counted with grads); 0-d entries (Adam's ``step`` counters) are not
per-parameter
state and are reported apart.

Layer: measure, primitives (importable from every layer above config, predict and model).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import weakref
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from recompute_lab.measure.target_kernels import TargetKernels


def _local(t: Tensor) -> Tensor:
    """The tensor this process holds: a DTensor's local shard, the result inside a collective's
    pending wrapper
    (funcol's AsyncCollectiveTensor, whose own storage is invalid), any other tensor itself."""
    if hasattr(t, "to_local") and hasattr(t, "placements"):
        t = t.to_local()
    while isinstance(getattr(t, "elem", None), Tensor) and type(t) is not Tensor:
        t = t.elem
    return t


def storage_key(t: Tensor) -> tuple:
    t = _local(
        t
    )  # a DTensor's own storage is a wrapper: key its local shard (tensor parallelism, FSDP2)
    s = t.untyped_storage()
    # All meta tensors report data_ptr 0: tell their storages apart by the storage object itself.
    return (t.device.type, s._cdata if t.device.type == "meta" else s.data_ptr())


def unique_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once)."""
    seen: dict[tuple, int] = {}
    for t in map(_local, tensors):
        seen.setdefault(storage_key(t), t.untyped_storage().nbytes())
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
    per = {
        "params": unique_bytes(params),
        "grads": unique_bytes(grads) + unique_bytes(grad_fp32),
        "master": unique_bytes(master),
        "optimizer": unique_bytes(adam),
    }
    n = sum(p.numel() for p in {id(p): p for p in params}.values())
    return {
        "per_param": per,
        "total": sum(per.values()),
        "bytes_per_param": sum(per.values()) / max(n, 1),
        "optimizer_step_counters": unique_bytes(scalars),
        "dtypes": _dtypes(params, grads + grad_fp32, master, adam),
    }


def _dtypes(params, grads, master, adam) -> dict:
    def names(ts):
        return sorted({str(t.dtype).replace("torch.", "") for t in ts})

    return {
        "params": names(params),
        "grads": names(grads),
        "master": names(master),
        "optimizer": names(adam),
    }


class StepTimer:
    """Wall time of one step: CUDA events when on GPU (asynchronous kernels), perf_counter on
    CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "StepTimer":
        if self.cuda:
            self._start, self._end = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
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
    """Allocator peak since the last reset (CUDA only; on CPU the MemTracker path of measure
    applies)."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.max_memory_allocated(device),
        "reserved": torch.cuda.max_memory_reserved(device),
    }


class LiveStorages(TorchDispatchMode):
    """Remembers which aten op produced each storage (view ops, whose output aliases an input, are
    skipped),
    and keeps a weak reference to every new storage, to tell afterwards which of them are still
    alive."""

    def __init__(self, where: Optional[Callable[[], str]] = None):
        super().__init__()
        self.op: dict[tuple, str] = {}
        self.new: dict[
            tuple, tuple
        ] = {}  # storage key -> (weak ref, bytes); a reused address overwrites
        self.where = where  # names the module running now: each new storage is billed to it
        self.made_in: dict[tuple, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {storage_key(a) for a in args if isinstance(a, Tensor)}
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, Tensor) and o.layout == torch.strided:
                k = storage_key(o)
                if k not in ins:
                    self.op[k] = func.overloadpacket.__name__
                    st = _local(o).untyped_storage()
                    self.new[k] = (StorageWeakRef(st), st.nbytes())
                    if self.where is not None:
                        self.made_in[k] = self.where()
        return out

    def alive(self, exclude: set) -> dict[tuple, int]:
        """Storages made under this mode that are still alive (and not in ``exclude``): key ->
        bytes."""
        return {k: n for k, (ref, n) in self.new.items() if k not in exclude and not ref.expired()}

    def resident(self, exclude: set) -> int:
        """Bytes of storages made under this mode that are still alive (and not in ``exclude``)."""
        return sum(self.alive(exclude).values())


class RngStates:
    """The CPU RNG states the forward stashes and keeps: torch.utils.checkpoint (and
    recompute_lab.strategies.wrap.RngStateHook) call ``torch.get_rng_state()`` once per region
    with ``preserve_rng_state`` and hold the state until backward (5,056 B with torch 2.13's
    Mersenne Twister generator). It is made outside the dispatcher, so neither the pack hook nor
    LiveStorages sees it; it lives in host memory on every device. Inside this context every
    state ``torch.get_rng_state`` returns is tracked by weak reference; ``kept()`` counts those
    still alive."""

    def __enter__(self) -> "RngStates":
        self.real, self.refs = torch.get_rng_state, []

        def recorded() -> Tensor:
            state = self.real()
            self.refs.append(weakref.ref(state))
            return state

        torch.get_rng_state = recorded
        return self

    def __exit__(self, *exc) -> None:
        torch.get_rng_state = self.real

    def alive(self) -> list[Tensor]:
        return [t for t in (r() for r in self.refs) if t is not None]

    def kept(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.alive())

    def count(self) -> int:
        return len(self.alive())


# Freezes in force that this module knows of: open older_objects_frozen blocks, and a process's
# own (freeze_older_objects, or one in force when this module is imported: a server that froze its
# start-up objects before forking workers, as the gc module's documentation advises).
# gc.get_freeze_count() tells too, but it walks the frozen list (~3 ms with torch imported): asked
# once here, not on every block.
_FREEZES = [int(gc.get_freeze_count() > 0)]


def freeze_older_objects() -> None:
    """Freeze every object alive now (gc.freeze) for the rest of the process, for a process that
    freezes at points of its own: the test runner freezes before each test what earlier tests left
    (tests/conftest.py). older_objects_frozen blocks then leave that freeze in force."""
    gc.freeze()
    _FREEZES[0] += 1


@contextlib.contextmanager
def older_objects_frozen():
    """The objects alive on entry out of the cyclic collector's sight for the block (gc.freeze): a
    collection inside it scans only what the block made, not every object the process holds.

    A freeze already in force on entry (an enclosing block's, or the process's own from
    freeze_older_objects) is left as it is, neither extended nor thawed on exit: gc.unfreeze()
    thaws every freeze at once, so thawing here would undo the enclosing one, and freezing again
    would keep the newer objects frozen, uncollectable, after the block. The enclosing freeze
    already hides the older objects; the block's collection scans what came after it."""
    if _FREEZES[0]:
        yield
        return
    gc.freeze()
    _FREEZES[0] += 1
    try:
        yield
    finally:
        _FREEZES[0] -= 1
        gc.unfreeze()


def saved_tensors(model: nn.Module, forward: Callable[[], Any]) -> dict:
    """Bytes autograd keeps for backward after ``forward()`` runs ``model`` once (CPU, CUDA or
    meta).

    A saved_tensors_hooks pack hook sees every tensor an op saves outside checkpoint regions (inside
    a
    region torch.utils.checkpoint's own hook is innermost, so only the region's inputs reach us,
    which is what
    stays resident). Storages are counted once (views share one), parameters and buffers are
    excluded, and a
    save whose tensor died before the forward ended is not counted. Each storage is billed to the
    module whose
    forward was running when it was first saved ("loss": GPT.forward itself, i.e. the cross-entropy)
    and to the
    aten op that produced it.

    ``total`` / ``by_module`` are the pack hook's count; ``resident_total`` / ``resident_by_module``
    every storage the forward made that is still alive (what the run keeps, op SAC's cache
    included), billed by module too (a storage no hook saw: to the module that made it), so the
    resident rows add up to the resident total.
    """
    exclude = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    names = {m: (n or "loss") for n, m in model.named_modules()}
    stack: list[str] = ["loss"]
    saved: dict[tuple, dict] = {}
    producers = LiveStorages(lambda: stack[-1])

    def pack(t: Tensor) -> Tensor:
        # What the graph keeps is a detached alias (same storage and version counter): returning
        # ``t`` itself
        # would make a saved output hold its own grad_fn, a reference cycle through C++ that
        # Python's garbage
        # collector cannot break, so every probed graph (and its model) stayed alive for the whole
        # process.
        held = t.detach()
        k = storage_key(t)
        if k not in exclude and (k not in saved or saved[k]["ref"]() is None):
            lt = _local(t)  # a DTensor (tensor parallelism): this rank's shard is what it holds
            saved[k] = {
                "module": stack[-1],
                "op": producers.op.get(k, "input"),
                "ref": weakref.ref(held),
                "nbytes": lt.untyped_storage().nbytes(),
                "dtype": str(t.dtype).replace("torch.", ""),
                "shape": list(lt.shape),
            }
        return held

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(lambda m, a: stack.append(names[m])))
        handles.append(
            m.register_forward_hook(lambda m, a, o: stack.pop() and None, always_call=True)
        )
    # Older objects out of the collector's sight: the collection below scans only what the forward
    # made, not every object the process holds (in a long-lived process that scan cost more than
    # the forward of a small model).
    try:
        with older_objects_frozen():
            with (
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                producers,
                RngStates() as rng,
            ):
                output = forward()
            live = [e for e in saved.values() if e["ref"]() is not None]
            gc.collect()
    finally:
        for h in handles:
            h.remove()
    # Second count, blind to nothing: every storage the forward made that is still alive, minus its
    # output.
    # It sees what saved_tensors_hooks cannot: op SAC's cache of saved outputs, save_on_cpu's
    # copies.
    out_keys = {storage_key(t) for t in tree_leaves(output) if isinstance(t, Tensor)}
    alive = producers.alive(exclude | out_keys)
    # ...plus saved tensors made before the forward (the token ids and targets), which the mode
    # never saw.
    before = {
        k: e["nbytes"]
        for k, e in saved.items()
        if e["ref"]() is not None and k not in producers.new
    }
    resident = sum(alive.values()) + sum(before.values())
    # The resident storages by module: a saved one billed as the pack hook bills it (its first
    # saver), any other (op SAC's cache, save_on_cpu's copies) to the module that made it.
    resident_by_module: dict[str, int] = {}
    for k, nbytes in (*alive.items(), *before.items()):
        hooked = saved.get(k)
        module = (
            hooked["module"]
            if hooked is not None and hooked["ref"]() is not None
            else producers.made_in[k]
        )
        resident_by_module[module] = resident_by_module.get(module, 0) + nbytes
    by_module: dict[str, int] = {}
    by_op: dict[str, int] = {}
    for e in live:
        by_module[e["module"]] = by_module.get(e["module"], 0) + e["nbytes"]
        by_op[e["op"]] = by_op.get(e["op"], 0) + e["nbytes"]
    tensors = [{k: v for k, v in e.items() if k != "ref"} for e in live]
    return {
        "total": sum(by_module.values()),
        "by_module": by_module,
        "by_op": by_op,
        "tensors": tensors,
        "resident_total": resident,
        "resident_by_module": resident_by_module,
        "rng_state_bytes": rng.kept(),
        "rng_states": rng.count(),
        "output": output,
    }


def release_parameters(model: nn.Module) -> None:
    """Free the storages of ``model``'s parameters and gradients (the model is not used again).
    After a
    MemTracker step (torch 2.13) the Parameter objects stay referenced from autograd's C++ side,
    where Python's
    garbage collector cannot reach them: without this, every probe kept one copy of the model's
    parameters alive
    for the rest of the process (~85 MB per job of an in-process sweep over `small`)."""
    for p in model.parameters():
        p.grad = None
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


MEMTRACKER_CATEGORIES = {
    "Parameter": "params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Activation": "act",
    "Temp": "temp",
    "Optstate": "optimizer",
    "Other": "other",
    "Total": "total",
}


def mem_tracker_step(
    model: nn.Module,
    optimizer,
    forward: Callable[[], Tensor],
    finish: Callable[[Tensor], None],
    inputs: Iterable[Tensor] = (),
) -> dict:
    """Peak bytes by category over one step (``forward()``, then ``finish(loss)``: backward +
    optimizer step).

    Uses torch.distributed._tools.mem_tracker.MemTracker, a private module: when it cannot be
    imported or fails,
    returns ``{"available": False, "reason": ...}``. ``after_forward`` is the snapshot between
    forward and
    backward: its ``act`` holds the saved activations plus whatever else the forward left alive (the
    loss).
    ``inputs`` (the batch, made before the tracker starts) are registered as ``other``;
    unregistered, a view
    taken inside the step would make MemTracker file their storage under activations.
    """
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except Exception as e:  # private API: absent or renamed in other torch versions
        return {"available": False, "reason": f"MemTracker unavailable: {type(e).__name__}: {e}"}

    def by_category(snap: dict) -> dict:
        merged: dict[str, int] = {}
        for dev_snap in snap.values():
            for k, v in dev_snap.items():
                name = MEMTRACKER_CATEGORIES.get(k, k)
                merged[name] = merged.get(name, 0) + v
        return merged

    try:
        mt = MemTracker()
        mt.track_external(model, optimizer, *inputs)
        with mt:
            loss = forward()
            after_forward = by_category(mt.get_tracker_snapshot("current"))
            finish(loss)
            del loss
        peak = by_category(mt.get_tracker_snapshot("peak"))
    except Exception as e:  # never let a diagnostic kill the run
        return {"available": False, "reason": f"MemTracker failed: {type(e).__name__}: {e}"}
    return {
        "available": True,
        "peak": peak.get("total", 0),
        "by_category": peak,
        "after_forward": after_forward,
    }


def remat_saved_bytes(forward: Callable[[], Tensor]) -> dict:
    """torch_remat's own count of the bytes saved for backward, on a forward of its own.

    torch_remat.format_saved_tensors_report(loss) walks the autograd graph from the loss and bills
    each resident
    saved storage once (grad-requiring leaves, i.e. parameters, excluded). Its header rounds to KiB,
    so the exact
    total comes from the same collection it formats (its private ``_walk_graph`` and live-region
    tapes); the
    report text is kept too. It cannot see tensors held by torch.utils.checkpoint's frames (region
    inputs) nor
    saves whose pack hook another saved_tensors_hooks owns, hence its own forward, with no hooks of
    ours.
    """
    try:
        import torch_remat
        from torch_remat._saved_report import _attribute_regions, _iter_live_regions, _walk_graph
    except Exception as e:
        return {"available": False, "reason": f"torch_remat unavailable: {type(e).__name__}: {e}"}
    loss = forward()
    try:
        views = _attribute_regions(list(_iter_live_regions()))
        claimed = {k for view in views for k in view.owned}
        regions = sum(s.nbytes for view in views for s in view.owned.values())
        graph = _walk_graph([loss], set(claimed))
        total = regions + sum(g.nbytes for g in graph.values())
        report = torch_remat.format_saved_tensors_report(loss)
    except Exception as e:
        return {"available": False, "reason": f"torch_remat report failed: {type(e).__name__}: {e}"}
    finally:
        del loss
    return {
        "available": True,
        "total": total,
        "regions": regions,
        "report": report.splitlines()[:12],
    }


class CudaPeak:
    """max_memory_allocated / max_memory_reserved over a ``with`` block (CUDA only; a no-op
    elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict | None = None

    def __enter__(self) -> "CudaPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result = {
                "allocated": torch.cuda.max_memory_allocated(self.device),
                "reserved": torch.cuda.max_memory_reserved(self.device),
                "start": self.start,
            }


def meta_saved_tensors(model: nn.Module, batch: int, seq: int, target: str) -> dict:
    """:func:`saved_tensors` of one forward of a meta-device model, the meta ops saving what
    ``target``'s
    kernels (cuda | cpu) save (recompute_lab.measure.target_kernels)."""
    idx = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    kernels = TargetKernels(target)

    def forward():
        with kernels:
            return model(idx, idx.clone())

    return saved_tensors(model, forward)


def step_memory(device: torch.device) -> dict:
    """Memory now, for the per-step W&B series: the CUDA allocator's allocated / reserved bytes (and
    the peak since
    the loop's reset) on CUDA; the process's resident set size on CPU (Linux /proc; empty where
    unavailable)."""
    if device.type == "cuda":
        return {
            "memory/allocated_bytes": torch.cuda.memory_allocated(device),
            "memory/reserved_bytes": torch.cuda.memory_reserved(device),
            "memory/max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        }
    try:
        with open("/proc/self/statm") as f:
            return {"memory/rss_bytes": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
    except (OSError, ValueError, IndexError, AttributeError):
        return {}

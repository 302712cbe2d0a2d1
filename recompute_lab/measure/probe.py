"""The memory probe: one instrumented training step, before the timed steps, that fills
results["memory"].

Every path of recompute_lab.measure.memory runs here and sits beside recompute_lab.predict.theory's
prediction:
  saved tensors    saved_tensors_hooks over one forward, storages counted once, by module and by
                   aten op
  MemTracker       PyTorch's (private) tracker over one full step: peak bytes by category
  torch_remat      its saved-tensors report, on a forward of its own (it cannot see through our
                   hooks)
  CUDA allocator   max_memory_allocated / reserved over the same step; optionally a memory snapshot
                   pickle

Choice: the probe's two real steps (a warm step, so that the optimizer state exists and the
measured step is a steady-state step, then the measured step under MemTracker) are the training
run's own steps 0 and 1 where nothing it measures changes (``shares_training_steps``: one process
on CPU, eager, one micro-batch per step, at least two warmup steps; recompute_lab.run.engine runs
them as ``probed_train_step``), and its two forward-only counts run after step 1 inside
torch.random.fork_rng: the run's parameters, optimizer state, RNG stream and data are exactly
those of an unprobed run (tests/integration/test_probe_shared.py holds the memory figures equal
to the fresh-model probe's and the loss history to an unprobed run's). Elsewhere the probe trains
a FRESH model (same config, dtype and strategy) with its own optimizer, built before the training
model exists and inside fork_rng, so that on CUDA the allocator peak sees one model, not two.

Layer: measure.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Optional

import torch

from recompute_lab.predict import prediction
from recompute_lab.predict import theory
from recompute_lab.config import ConfigError
from recompute_lab.config.spec import RunSpec, Shape
from recompute_lab.run.failures import is_oom
from recompute_lab.measure.memory import (
    CudaPeak,
    mem_tracker_step,
    meta_saved_tensors,
    release_parameters,
    remat_saved_bytes,
    saved_tensors,
)
from recompute_lab.model.gpt import build_model
from recompute_lab.measure.hardware import device_memory_bytes
from recompute_lab.model.precision import make_precision
from recompute_lab.strategies import Plan, apply_strategy, parse_options
from recompute_lab.strategies.base import lookup


def layout(dctx) -> tuple[str, int, int]:
    """(parallel kind, world size, rank) of a DistContext (None: one process)."""
    if dctx is None or not dctx.enabled:
        return "none", 1, 0
    return str(dctx.kind), int(dctx.world_size), int(dctx.rank)


def shape_of(spec: RunSpec, device_type: str, dctx=None) -> Shape:
    """The run's micro-batch on ``device_type``'s kernels, on this rank of its data-parallel
    layout."""
    kind, world, rank = layout(dctx)
    return spec.shape(device_type, kind, world, rank)


def predicted_memory(
    cfg: RunSpec,
    policy,
    plan: Plan,
    n_params: int,
    device_type: str,
    dctx=None,
    counted_activations: Optional[int] = None,
) -> dict:
    """The run's prediction (recompute_lab.predict.prediction.predict) for this rank, as the probe
    reports it.
    Activations follow the dtype the model computes in, which under fsdp with bf16_master is FSDP's
    bf16 while
    ``policy`` (adapted by the DistContext) keeps fp32 shards: the shape carries the precision's
    name."""
    pred = prediction.predict(
        cfg, plan, shape_of(cfg, device_type, dctx), n_params, counted_activations
    )
    return {
        "setting": pred.shape,
        "activations": pred.activations,
        "model_state": pred.model_state,
        "peak": pred.peak,
    }


@contextlib.contextmanager
def memory_history(device: torch.device, path: Optional[Path]):
    """torch.cuda.memory._record_memory_history around the block, dumped to ``path`` (CUDA only)."""
    if path is None or device.type != "cuda":
        yield None
        return
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        yield path
    finally:
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)


def memory_probe(
    cfg: RunSpec,
    device: torch.device,
    policy,
    batch: tuple,
    snapshot: Optional[Path] = None,
    plan: Optional[Plan] = None,
    dctx=None,
    session=None,
) -> tuple[dict, Optional[Plan]]:
    """Run the probe step on a fresh model: (the ``memory`` section of results.json, the plan it
    applied).

    ``batch`` is one (idx, targets) micro-batch on ``device``; ``snapshot`` a path for the CUDA
    memory snapshot
    pickle (viewable at https://pytorch.org/memory_viz), or None; ``plan`` a plan this run already
    solved
    (replayed); ``dctx`` this rank's recompute_lab.run.distributed.DistContext: under ddp / fsdp the
    step is measured
    on the wrapped model, so the peak is this rank's; ``session`` the run's
    recompute_lab.measure.compiled.Session
    (compile.backend not off): the probe's model is compiled after its strategy, as the training
    model is.
    A probe that fails for any reason but memory or configuration does not stop training: the error
    is recorded
    as ``probe_error`` and the memory keys stay empty.
    Running out of memory and an invalid configuration do propagate (the training step would fail
    the same way).
    """
    try:
        return _probe(cfg, device, policy, batch, snapshot, plan, dctx, session)
    except ConfigError:
        raise
    except Exception as e:
        if is_oom(
            e
        ):  # the training step would run out too: the run ends as oom, not with a warning
            raise

        warnings.warn(
            f"memory probe failed, training goes on: {type(e).__name__}: {e}", stacklevel=2
        )
        return {"probe_error": f"{type(e).__name__}: {e}"}, plan


def _probe(
    cfg: RunSpec,
    device: torch.device,
    policy,
    batch: tuple,
    snapshot: Optional[Path],
    plan: Optional[Plan],
    dctx=None,
    session=None,
) -> tuple[dict, Plan]:
    idx, targets = batch
    devices = [device] if device.type == "cuda" else []
    wrapped = dctx is not None and dctx.enabled
    with torch.random.fork_rng(devices=devices):
        model = build_model(cfg.model, device, policy.param_dtype)
        plan = apply_strategy(model, cfg.strategy, shape_of(cfg, device.type, dctx), reuse=plan)
        n_params = model.get_num_params()
        if session is not None:
            session.apply(model)  # after the strategy, before DDP / FSDP (torchtitan's order)
        if wrapped:  # the step as this rank runs it: DDP / FSDP2 around the recomputation wrappers
            model = dctx.wrap(model)
        optimizer = policy.build_optimizer(model, cfg.optimizer)
        model.train()

        def forward() -> torch.Tensor:
            with policy.autocast(device.type):
                return model(idx, targets)

        def finish(loss: torch.Tensor) -> None:  # the training loop's step: backward, clip, step
            loss.backward()
            norm = (
                policy.clip_grad_norm(model, optimizer, cfg.optimizer.grad_clip)
                if cfg.optimizer.grad_clip
                else None
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del norm  # held through the step, as the loop holds its grad_norm

        if session is None:
            finish(
                forward()
            )  # warm step: the optimizer state exists from here on, as in every later step
        # the warm step compiles (timed as time.compile_s when it is the run's first compiled step)
        else:
            session.first_step(lambda: finish(forward()), "memory probe's warm step")
        with memory_history(device, snapshot), CudaPeak(device) as cuda:
            tracked = (
                mem_tracker_step(model, optimizer, forward, finish, inputs=(idx, targets))
                if session is None
                else {"available": False, "reason": COMPILED_MEMTRACKER}
            )
        if not tracked["available"]:  # still run the step the allocator counters measure
            with CudaPeak(device) as cuda:
                finish(forward())
        if wrapped:
            # Saved tensors are counted on a plain replica in the dtype this rank computes in
            # (FSDP's mixed
            # precision gathers bf16 parameters): a sharded model's parameters change identity
            # during forward.
            model = optimizer = None
            compute = make_precision(cfg.precision)
            model = build_model(cfg.model, device, compute.param_dtype).train()
            apply_strategy(model, cfg.strategy, cfg.shape(), reuse=plan)
            if session is not None:
                session.apply(model)
        if session is not None:
            return _compiled_memory(
                cfg, device, policy, plan, n_params, dctx, session, model, forward, cuda, snapshot
            ), plan
        counted = saved_tensors(model, forward)
        del counted["output"]  # drop the graph: its saved tensors are freed here
        remat = remat_saved_bytes(forward)
        if tracked["available"] and not wrapped:
            release_parameters(
                model
            )  # MemTracker leaves the probe model's parameters referenced (see there)
        model = optimizer = None  # frees both: the closures above share these variables
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _memory_section(
        cfg, device, policy, plan, n_params, dctx, counted, remat, tracked, cuda, snapshot
    ), plan


def _memory_section(
    cfg: RunSpec,
    device: torch.device,
    policy,
    plan: Plan,
    n_params: int,
    dctx,
    counted: dict,
    remat: dict,
    tracked: dict,
    cuda: CudaPeak,
    snapshot: Optional[Path],
) -> dict:
    """results.json's ``memory`` section from the probe's counts (an eager model's)."""
    pred = predicted_memory(cfg, policy, plan, n_params, device.type, dctx)
    act, peak = pred["activations"], pred["peak"]
    regions = sum(v for k, v in counted["by_module"].items() if k in set(plan.recomputed))
    activation = {
        # measured: every storage the forward made that is still alive (sees op SAC's cache and
        # save_on_cpu
        # copies); hooked: what saved_tensors_hooks saw, by module and op. Equal for module-level
        # strategies.
        "predicted": act["total"],
        "measured": counted["resident_total"],
        "hooked": counted["total"],
        "by_module": counted["by_module"],
        "by_op": counted["by_op"],
        "predicted_by_module": act.get("by_module"),
        "prediction_note": act["reason"],
        "logits": {"predicted": act.get("logits"), "measured": _logits(counted)},
        "checkpoint_inputs": regions,
        # host memory the checkpoint regions keep besides their inputs: one CPU RNG state each
        # (torch.get_rng_state(); not in measured, which theory matches byte for byte)
        "checkpoint_rng_state": {
            "bytes": counted["rng_state_bytes"],
            "regions": counted["rng_states"],
        },
        "micro_batch": {"batch": cfg.data.batch_size, "seq": cfg.data.seq_len},
        "remat_report": remat,
        "korthikanti_per_layer": theory.korthikanti_layer_bytes(
            cfg.data.seq_len, cfg.data.batch_size, cfg.model.d_model, cfg.model.n_head
        ),
        "naive_per_layer": theory.naive_layer_bytes(
            cfg.data.seq_len, cfg.data.batch_size, cfg.model.d_model
        ),
    }
    if cuda.result is not None:
        measured, source = cuda.result["allocated"], "cuda_allocator"
    else:
        measured, source = (
            (tracked.get("peak"), "mem_tracker") if tracked["available"] else (None, None)
        )
    peak_bytes = {
        "predicted": None if peak is None else peak["total"],
        "measured": measured,
        "source": source,
        "by_category": tracked.get("by_category"),
        "predicted_parts": peak,
        "mem_tracker": tracked,
        "cuda": cuda.result,
        "snapshot": str(snapshot) if snapshot is not None and device.type == "cuda" else None,
    }
    if snapshot is not None and device.type != "cuda":
        peak_bytes["snapshot_note"] = (
            "trainer.memory_snapshot records the CUDA caching allocator: nothing on CPU"
        )
    return {
        "activation_bytes": activation,
        "peak_bytes": peak_bytes,
        "plan": plan.to_dict(),
        "theory_setting": theory_setting(pred["setting"]),
    }


# --- the probe on the training run's own steps ----------------------------------------------

SHARED_STEP = 1  # the training step the probe measures: step 0 made the optimizer state


def shares_training_steps(cfg: RunSpec, device_type: str, session=None, dctx=None) -> bool:
    """Whether the probe's two real steps (a warm step, then the measured step) can be the training
    run's steps 0 and 1 instead of steps of a fresh model, with the same figures. Not when: a
    step is several micro-batches (the probe's step is one); the step is compiled (its first
    step is timed as compile_s) or parallel (a wrapped replica); on CUDA (the allocator counts
    whatever else lives on the device, and its reserved pool's history would change
    training_reserved; a memory snapshot records the probe's step); the run has fewer than two
    steps, or fewer than two warmup steps (the measured step runs under MemTracker, several times
    slower: it must not be a timed step). A resumed run starts past step 0: train() asks only for
    fresh runs."""
    t = cfg.trainer
    return (
        t.probe
        and device_type == "cpu"
        and session is None
        and (dctx is None or not dctx.enabled)
        and t.grad_accum == 1
        and t.steps >= 2
        and t.warmup_steps >= 2
        and not t.memory_snapshot
    )


def memory_of_training_step(
    cfg: RunSpec,
    device: torch.device,
    policy,
    plan: Plan,
    model,
    batch: tuple,
    tracked: dict,
) -> dict:
    """The ``memory`` section for a probe whose measured step was training step ``SHARED_STEP``
    (``tracked``: its MemTracker figures); the saved-tensor and torch_remat counts run here on
    ``batch``, each on a forward of its own (no backward: the model is not changed), inside
    fork_rng so that dropout draws nothing from the training run's stream. Errors as
    memory_probe's: out of memory and configuration errors propagate, others become
    ``probe_error``."""
    idx, targets = batch

    def forward() -> torch.Tensor:
        with policy.autocast(device.type):
            return model(idx, targets)

    try:
        with torch.random.fork_rng(devices=[]):
            counted = saved_tensors(model, forward)
            del counted["output"]  # drop the graph: its saved tensors are freed here
            remat = remat_saved_bytes(forward)
        return _memory_section(
            cfg,
            device,
            policy,
            plan,
            model.get_num_params(),
            None,
            counted,
            remat,
            tracked,
            CudaPeak(device),
            None,
        )
    except ConfigError:
        raise
    except Exception as e:
        if is_oom(e):
            raise
        warnings.warn(
            f"memory probe failed, training goes on: {type(e).__name__}: {e}", stacklevel=2
        )
        return {"probe_error": f"{type(e).__name__}: {e}"}


COMPILED_MEMTRACKER = (
    "MemTracker not run on a compiled model: its TorchDispatchMode and module hooks make dynamo "
    "recompile under them or run the step eagerly, so its peak would not be the compiled step's"
)
COMPILED_PREDICTION = (
    "compiled: AOTAutograd's partitioner chooses what is saved (compile.memory_budget); "
    "recompute_lab.predict.theory predicts the eager strategy only"
)


def _compiled_memory(
    cfg: RunSpec,
    device: torch.device,
    policy,
    plan: Plan,
    n_params: int,
    dctx,
    session,
    model,
    forward,
    cuda: CudaPeak,
    snapshot: Optional[Path],
) -> dict:
    """The probe's memory section for a compiled model: saved bytes by a pack hook dynamo does not
    trace, the
    same bytes counted on the partitioned backward graphs (eager-kernel backend), CUDA allocator
    peak on CUDA;
    what cannot be measured under compilation is None with its reason."""
    from recompute_lab.measure import compiled

    session.recorder.reset()
    counted = compiled.count_saved(model, forward)
    calls = session.recorder.calls
    del counted["output"]
    if session.records_graphs and not calls:
        raise RuntimeError(
            "the compiled graphs did not run in the probe's forward (dynamo fell back to eager): "
            "saved bytes would be the eager model's"
        )
    graph = (
        {
            "total": sum(p.calls * p.saved_bytes() for p in session.recorder.pairs),
            "calls": calls,
            "method": "sum over the partitioned backward graphs' inputs (no tangents, no "
            "parameters, storages "
            "once), times each graph's forward calls",
        }
        if session.records_graphs
        else {"total": None, "reason": compiled.INDUCTOR_FLOPS_REASON}
    )
    pred = predicted_memory(cfg, policy, plan, n_params, device.type, dctx)
    activation = {
        "predicted": None,
        "prediction_note": COMPILED_PREDICTION,
        "eager_predicted": pred["activations"]["total"],
        "measured": counted["total"],
        "hooked": counted["total"],
        "graph_count": graph,
        "method": "saved_tensors_hooks pack hook (dynamo-disabled) over one compiled forward; "
        "storages once, "
        "parameters and buffers excluded",
        "by_module": None,
        "by_module_reason": "module hooks on a compiled model make dynamo recompile; by dtype "
        "instead",
        "by_dtype": counted["by_dtype"],
        "micro_batch": {"batch": cfg.data.batch_size, "seq": cfg.data.seq_len},
        "remat_report": {"available": False, "reason": "not run on a compiled model"},
    }
    measured, source = (
        (cuda.result["allocated"], "cuda_allocator") if cuda.result is not None else (None, None)
    )
    peak_bytes = {
        "predicted": None,
        "prediction_note": COMPILED_PREDICTION,
        "measured": measured,
        "source": source,
        "cuda": cuda.result,
        "mem_tracker": {"available": False, "reason": COMPILED_MEMTRACKER},
        "snapshot": str(snapshot) if snapshot is not None and device.type == "cuda" else None,
    }
    if measured is None:
        peak_bytes["reason"] = (
            f"on {device.type} only MemTracker measures a peak: {COMPILED_MEMTRACKER}"
        )
    return {
        "activation_bytes": activation,
        "peak_bytes": peak_bytes,
        "plan": plan.to_dict(),
        "theory_setting": theory_setting(pred["setting"]),
    }


def theory_setting(st: Shape) -> dict:
    """results.json's memory.theory_setting: the shape the theory was given (keys as schema_version
    1 has them)."""
    return {
        "batch": st.batch,
        "seq": st.seq,
        "param_bytes": st.param_bytes,
        "autocast_bytes": st.autocast_bytes,
        "device": st.device,
    }


def _logits(counted: dict) -> int:
    """Measured bytes of the fp32 cross-entropy input (log_softmax's saved output)."""
    return sum(
        t["nbytes"]
        for t in counted["tensors"]
        if t["module"] == "loss" and t["op"] == "_log_softmax"
    )


EAGER_SCORES_WARN_BYTES = 2**30  # one layer's (b, h, s, s) fp32 scores above 1 GiB: say so


MAX_BLOCKS = prediction.MAX_BLOCKS  # the deepest model built (recompute_lab.predict.prediction)


def price_model_state(cfg: RunSpec, device_type: str, dctx=None) -> tuple[int, int]:
    """(parameters, model-state bytes of this rank) from shapes alone: the analytic parameter count
    and the one prediction path (recompute_lab.predict.prediction.model_state); nothing is built."""
    n_params = theory.param_count(cfg.model)
    return n_params, prediction.model_state(
        cfg.model, shape_of(cfg, device_type, dctx), n_params
    )["total"]


def guard_blocks(cfg: RunSpec, device_type: str, dctx=None) -> None:
    """Refuse, before any replica is built, a model deeper than MAX_BLOCKS (train's guard and
    estimate both build one on the meta device first); the message prices it from shapes alone.
    In train it comes after guard_memory's model-state check, so a model that cannot fit is still
    ``oom`` ("model state alone ... exceeds")."""
    n = cfg.model.n_layer
    if n <= MAX_BLOCKS:
        return
    n_params, state = price_model_state(cfg, device_type, dctx)
    raise ConfigError(
        f"model.n_layer={n:,} is more blocks than recompute_lab builds a model with (at most "
        f"{MAX_BLOCKS:,}; each block takes tens of ms and ~150 KB of Python objects, even on the "
        f"meta device); priced from shapes alone it has {n_params:,} parameters and "
        f"{state / 1e9:,.1f} GB of model state per rank; nothing was built. Use "
        f"model.n_layer <= {MAX_BLOCKS:,} (model state and activations grow linearly with n_layer)"
    )


class PredictedOOM(torch.OutOfMemoryError):
    """trainer.max_memory_gb: the predicted peak does not fit, so nothing is allocated."""


def guard_memory(
    cfg: RunSpec, policy, device: torch.device, results: dict, dctx=None
) -> Optional[Plan]:
    """Refuse (status oom, nothing allocated) a run whose predicted memory exceeds the guard's
    limit; under
    ``dctx`` (ddp / fsdp) the prediction is this rank's (recompute_lab.predict.peak).

    The limit is ``trainer.max_memory_gb`` or, by default, the device's own memory
    (recompute_lab.measure.hardware). First
    the model state from an analytic parameter count, before anything is built (so
    ``model.n_layer=1000000000``
    is refused at once); then the step's predicted peak on a meta replica with the strategy applied.
    Strategies
    that solve a plan for the run's device (budget) are guarded by model state only unless the limit
    is explicit:
    a meta solve would not be the device's plan. Returns the plan applied to the meta replica, for
    the run to
    replay, or None.
    """
    m, t = cfg.model, cfg.trainer
    scores = cfg.data.batch_size * m.n_head * cfg.data.seq_len**2 * 4
    if m.attention == "eager" and scores > EAGER_SCORES_WARN_BYTES:
        warnings.warn(
            f"attention=eager stores (b, h, s, s) scores: {scores / 2**30:.1f} GiB per layer at "
            f"seq_len {cfg.data.seq_len}; attention=sdpa or +strategy=selective avoid most of it",
            stacklevel=2,
        )
    if not t.memory_guard:
        return None
    explicit = t.max_memory_gb is not None
    limit, source = (
        (int(t.max_memory_gb * 1e9), f"trainer.max_memory_gb={t.max_memory_gb}")
        if explicit
        else device_memory_bytes(device)
    )
    if limit is None:
        return None
    guard = results["memory"]["guard"] = {"limit_bytes": limit, "source": source}
    if explicit:
        guard["max_memory_gb"] = t.max_memory_gb
    n_params, state = price_model_state(cfg, device.type, dctx)  # this rank's (fsdp: shards)
    guard["predicted_model_state_bytes"] = state
    hint = (
        "set trainer.max_memory_gb to the memory you mean, or trainer.memory_guard=false"
        if not explicit
        else "try a recomputation strategy, a smaller batch or seq_len"
    )
    if state > limit:
        raise PredictedOOM(
            f"model state alone ({n_params:,} params: {state / 1e9:.3f} GB) exceeds {source} "
            f"({limit / 1e9:.3f} GB); nothing was allocated ({hint})"
        )
    if not explicit and lookup(parse_options(cfg.strategy).name).reapply is not None:
        return None
    guard_blocks(cfg, device.type, dctx)  # the state fits, but the meta replica must be buildable
    meta = build_model(
        m, "meta", make_precision(cfg.precision).param_dtype
    ).train()  # the dtype it computes in
    plan = apply_strategy(
        meta, cfg.strategy, shape_of(cfg, device.type, dctx)
    )  # this rank's budget
    shape = shape_of(cfg, device.type, dctx)
    pred = prediction.predict(cfg, plan, shape, meta.get_num_params())
    if (
        pred.activation_bytes is None
    ):  # no closed form for this plan: count what its forward keeps on the meta replica (the
        # resident count: op SAC's cache included, which the pack hook's count misses)
        counted = meta_saved_tensors(meta, cfg.data.batch_size, cfg.data.seq_len, device.type)
        pred = prediction.predict(
            cfg, plan, shape, meta.get_num_params(), counted_activations=counted["resident_total"]
        )
    total = pred.peak_bytes
    guard["predicted_peak_bytes"] = total
    if total > limit:
        raise PredictedOOM(
            f"predicted peak {total / 1e9:.3f} GB exceeds {source} ({limit / 1e9:.3f} GB); "
            f"nothing was allocated ({hint})"
        )
    return plan

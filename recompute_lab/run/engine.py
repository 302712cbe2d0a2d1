"""One training run from a RunSpec: build, count FLOPs, restore, train, summarize, record.

Layer: run. ``run(spec, run_dir)`` is everything ``python -m recompute_lab.train`` does after Hydra
composes the
config (a composed config is turned into its RunSpec first, by recompute_lab.config.spec). It
always leaves one results.json in ``run_dir`` (status ok | oom | diverged | interrupted | error) and
always
finishes its W&B run. ``train`` reads top to bottom as the steps it takes: ``build`` (device,
precision, data,
memory guard and probe, the model with its recomputation plan), ``count_flops``, ``restore``,
``loop``,
``summarize``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from recompute_lab.config import ConfigError, Device
from recompute_lab.config.spec import RunSpec, plain_config
from recompute_lab.measure import compiled, flops, overhead
from recompute_lab.measure.hardware import env_info
from recompute_lab.measure.memory import (
    StepTimer,
    cuda_peak_bytes,
    mem_tracker_step,
    model_state_bytes,
    release_parameters,
    step_memory,
)
from recompute_lab.measure.probe import (
    SHARED_STEP,
    guard_blocks,
    guard_memory,
    memory_of_training_step,
    memory_probe,
    shape_of,
    shares_training_steps,
)
from recompute_lab.measure.timing import describe
from recompute_lab.model.gpt import build_model
from recompute_lab.model.precision import make_precision
from recompute_lab.predict import prediction
from recompute_lab.predict.prediction import Prediction
from recompute_lab.record.folder import FolderBusy, RecordNotSaved, RunFolder
from recompute_lab.record.logs import Laps, StepLines, seconds_text
from recompute_lab.record.results import format_summary, new_results
from recompute_lab.record.wandb_run import RunLogger
from recompute_lab.run import checkpoint, distributed
from recompute_lab.run import compiled_steps
from recompute_lab.run.failures import (
    Diverged,
    Interrupted,
    SignalFlag,
    install_oom_observer,
    is_oom,
    oom_report,
)
from recompute_lab.strategies import apply_strategy

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == Device.cuda and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda but CUDA is not available on this machine; valid here: auto, cpu"
        )
    if name == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def lr_lambda(ocfg, total_steps: int):
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    warm, floor = ocfg.warmup_steps, ocfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Run:
    """What ``build`` sets up for the loop."""

    device: torch.device
    # recompute_lab.model.precision.PrecisionPolicy, possibly adapted by the parallel layout
    policy: Any
    dctx: distributed.DistContext
    batches: Any
    model: torch.nn.Module
    plan: Any  # recompute_lab.strategies.Plan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    prediction: Optional[Prediction] = (
        None  # model state, activations, peak and FLOPs of this rank (predict/)
    )
    grad_norm: Optional[torch.Tensor] = None  # set by train_step (None when clipping is off)
    session: Optional[compiled.Session] = (
        None  # compile.backend not off: the run's torch.compile backend
    )
    # the training step the memory probe measures (its warm step is the step before), or None:
    # probed on a fresh model in build, or not at all (recompute_lab.measure.probe)
    probe_step: Optional[int] = None


def build(
    spec: RunSpec,
    results: dict,
    run_dir: Path,
    dctx: distributed.DistContext,
    share_probe: bool = False,
) -> Run:
    """Validate, pick the device and precision, guard and probe memory, build the model with its
    plan. ``share_probe`` (a fresh run that the loop trains from step 0): where
    recompute_lab.measure.probe.shares_training_steps allows it, the probe's two real steps are
    the training run's steps 0 and 1 (``Run.probe_step``), not steps of a fresh model."""
    laps = Laps(log)
    t = spec.trainer
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    device = dctx.setup(spec, resolve_device(t.device))  # joins the process group under torchrun
    dctx.rank_log(run_dir)  # ranks > 0: rank{N}.log in rank 0's folder
    install_oom_observer()
    policy = dctx.adapt_precision(make_precision(spec.precision))
    results["env"] = env_info(device, policy.param_dtype)
    torch.manual_seed(t.seed)
    laps(
        "setup",
        f"device {device}, {torch.get_num_threads()} thread(s), parameters {policy.param_dtype}",
    )
    plan = guard_memory(spec, policy, device, results, dctx)
    # also with trainer.memory_guard=false: no replica deeper than MAX_BLOCKS is ever built
    guard_blocks(spec, device.type, dctx)
    # the data only now: the synthetic table (vocab x 4 int64) is memory the guard priced first
    batches = dctx.batches(spec.data, spec.model.vocab_size)  # this rank's rows of the global batch
    session = compiled_steps.session_of(spec)
    if t.max_memory_gb is not None:
        laps("memory guard", f"predicted peak within trainer.max_memory_gb={t.max_memory_gb}")
    shared = share_probe and shares_training_steps(spec, device.type, session, dctx)
    # memory probe on a fresh model, before the training model exists (recompute_lab.measure.probe)
    if t.probe and not shared:
        snapshot = (
            Path(run_dir) / "memory_snapshot.pickle"
            if t.memory_snapshot and run_dir is not None
            else None
        )
        probe_batch = tuple(x.to(device) for x in batches.get(0, 0))
        memory, plan = memory_probe(
            spec, device, policy, probe_batch, snapshot, plan, dctx, session
        )  # this rank's
        results["memory"].update(memory)
        laps("memory probe", probe_note(results["memory"]))
    model = build_model(spec.model, device, policy.param_dtype)
    # a solved plan is replayed; a budget is solved for this rank (fsdp: its model-state shards)
    plan = apply_strategy(model, spec.strategy, shape_of(spec, device.type, dctx), reuse=plan)
    results["strategy"] = plan.to_dict()
    # The one prediction of this rank (recompute_lab.predict.prediction): the FLOP and model-state
    # figures below
    # and the probe's predicted bytes all come from it.
    pred = prediction.predict(spec, plan, shape_of(spec, device.type, dctx), model.get_num_params())
    laps(f"model + strategy {plan.name}", f"{model.get_num_params():,} params; {plan.description}")
    results["model"] = {
        "params": model.get_num_params(),
        "non_embedding_params": model.get_num_params(non_embedding=True),
        "n_layer": spec.model.n_layer,
        "d_model": spec.model.d_model,
        "n_head": spec.model.n_head,
        "seq_len": spec.data.seq_len,
        "batch_size": spec.data.batch_size,
        "grad_accum": t.grad_accum,
        "name": spec.model.name,
    }
    if session is not None:  # compiled after the strategy, before DDP / FSDP (torchtitan's order)
        results["compile"] = compiled_steps.first_step(
            spec,
            session.apply(model),
            session,
            policy,
            device,
            tuple(x.to(device) for x in batches.get(0, 0)),
        )
        laps(
            f"compile ({session.backend}, scope {session.scope})",
            f"first compiled step {session.first_step_s:.1f} s ({session.first_step_where})",
        )
    model = dctx.wrap(model)  # DDP / FSDP2 after the recomputation wrappers (torchtitan's order)
    optimizer = policy.build_optimizer(model, spec.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.optimizer, t.steps))
    return Run(
        device,
        policy,
        dctx,
        batches,
        model,
        plan,
        optimizer,
        scheduler,
        session=session,
        prediction=pred,
        probe_step=SHARED_STEP if shared else None,
    )


def count_flops(spec: RunSpec, run: Run, results: dict) -> dict:
    """FLOPs counted on a meta replica (no memory, no effect on the timed steps) beside the analytic
    prediction;
    a compiled run's recompute FLOPs come from its partitioned graphs
    (recompute_lab.measure.compiled)."""
    counted = flops.count_step_flops(spec, run.policy.param_dtype, run.plan)
    if run.session is not None:
        counted = compiled_steps.recompute_flops(
            spec, counted, results["compile"]["graphs_per_step"]
        )
    recompute = counted["recompute"]
    results["flops"].update(
        per_step={k: counted[k] for k in ("forward", "backward", "recompute")},
        predicted_per_step=run.prediction.flops,
        recompute_overhead=None
        if recompute is None
        else recompute / (counted["forward"] + counted["backward"]),
        by_op={"forward": counted["forward_by_op"], "backward": counted["backward_by_op"]},
        method=counted["method"],
    )
    if counted.get("recompute_reason"):
        results["flops"]["recompute_reason"] = counted["recompute_reason"]
    return counted


def restore(run: Run, results: dict, resume: Optional[tuple[Path, dict]]) -> int:
    """Resume from the checkpoint preflight verified, if any; return the first step to run."""
    if resume is None:
        return 0
    resume_from, state = resume
    checkpoint.restore(state, run.model, run.optimizer, run.scheduler)
    results["loss"]["history"].extend(state["history"])
    results["time"]["step_s"].extend(state["step_s"])
    results["resumed_from"] = {"path": str(resume_from), "step": state["step"]}
    return state["step"]


def record_model_state(run: Run, results: dict) -> None:
    """Model state right after the first optimizer step: params, grads and every optimizer buffer
    exist."""
    measured = model_state_bytes(run.model, run.optimizer)
    predicted = run.prediction.model_state  # this rank's (fsdp: its padded shards)
    results["memory"]["model_state_bytes"].update(
        predicted=predicted["total"],
        measured=measured["total"],
        per_param=measured["per_param"],
        predicted_per_param=predicted["per_param"],
        dtypes=measured["dtypes"],
        bytes_per_param={
            "predicted": predicted["bytes_per_param"],
            "measured": measured["bytes_per_param"],
        },
    )


def train_step(
    spec: RunSpec,
    run: Run,
    micro: list,
    progress: dict,
    model: Optional[torch.nn.Module] = None,
    where: str = "",
) -> torch.Tensor:
    """One optimizer step over the micro-batches ``micro``: forward, backward, clip, step; the
    summed loss.

    ``model``: the module to run (default ``run.model``; the overhead measurement passes a baseline
    that shares
    its parameters and optimizer). The spec's fields are plain Python attributes (no OmegaConf
    lookup per step:
    ~25 us each, 2-3% of a 7 ms `tiny` step, experiments/bench_overhead). A non-finite gradient norm
    (with trainer.stop_on_nan) raises Diverged before the optimizer steps; the
    exception carries the step's summed loss as ``loss``.
    """
    model = run.model if model is None else model
    grad_accum, grad_clip = spec.trainer.grad_accum, spec.optimizer.grad_clip
    optimizer, device = run.optimizer, run.device
    optimizer.zero_grad(set_to_none=True)
    loss_sum = None
    for idx, targets in micro:
        progress["phase"] = "forward"
        with run.policy.autocast(device.type):
            loss = model(idx, targets)
            if (
                grad_accum > 1
            ):  # no extra ops (and their dispatch cost) for the common single micro-batch
                loss = loss / grad_accum
        progress["phase"] = "backward"
        loss.backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    progress["phase"] = "optimizer"
    grad_norm = None
    if grad_clip > 0:
        grad_norm = run.policy.clip_grad_norm(model, optimizer, grad_clip)
    if spec.trainer.stop_on_nan and grad_norm is not None and not torch.isfinite(grad_norm):
        err = Diverged(f"non-finite gradient norm {grad_norm.item()} {where}".rstrip())
        err.loss = loss_sum.item()
        raise err
    run.grad_norm = grad_norm  # the step's clipped-gradient norm, for the per-step log
    optimizer.step()
    run.scheduler.step()
    return loss_sum


def probed_train_step(
    spec: RunSpec, run: Run, micro: list, progress: dict, where: str = ""
) -> tuple[torch.Tensor, dict]:
    """train_step as the memory probe's measured step (``Run.probe_step``): forward, then
    backward, clip and optimizer step under MemTracker, as recompute_lab.measure.probe's step on
    a fresh model runs them (no gradients when it starts, freed when it ends); the scheduler steps
    after it. Returns the loss and MemTracker's figures. When MemTracker is unavailable or fails
    before the optimizer stepped, the step runs again plainly from where it started (gradients
    cleared, the RNG state restored): the training run never takes a half or a double step."""
    ((idx, targets),) = micro  # shares_training_steps: one micro-batch per step
    model, optimizer, policy, device = run.model, run.optimizer, run.policy, run.device
    grad_clip = spec.optimizer.grad_clip
    state: dict = {}
    optimizer.zero_grad(set_to_none=True)  # before the tracker: it starts as the probe's did
    rng = torch.get_rng_state()

    def forward() -> torch.Tensor:
        progress["phase"] = "forward"
        with policy.autocast(device.type):
            return model(idx, targets)

    def finish(loss: torch.Tensor) -> None:
        progress["phase"] = "backward"
        loss.backward()
        state["loss"] = loss.detach()
        progress["phase"] = "optimizer"
        norm = policy.clip_grad_norm(model, optimizer, grad_clip) if grad_clip > 0 else None
        if spec.trainer.stop_on_nan and norm is not None and not torch.isfinite(norm):
            err = Diverged(f"non-finite gradient norm {norm.item()} {where}".rstrip())
            err.loss = state["loss"].item()
            state["diverged"] = err  # raised below: MemTracker's guard would swallow it
            return
        run.grad_norm = norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as the probe's step: freed inside the tracker

    # registered before MemTracker's hooks, so it runs first: a step that happened is known even
    # if the tracker fails after it
    hook = optimizer.register_step_post_hook(lambda *args: state.update(stepped=True))
    try:
        tracked = mem_tracker_step(model, optimizer, forward, finish, inputs=(idx, targets))
        if "diverged" in state:
            raise state["diverged"]
        if not state.get("stepped"):
            optimizer.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            finish(forward())
            if "diverged" in state:
                raise state["diverged"]
        optimizer.zero_grad(set_to_none=True)
    finally:
        hook.remove()
    run.scheduler.step()
    return state["loss"], tracked


@dataclass
class Job:
    """What a run reports into while it trains: its record (filled in place), the W&B run, its
    folder, the step and phase now (for a failure record) and the signal flag."""

    results: dict
    logger: RunLogger
    run_dir: Path
    progress: dict
    signals: SignalFlag


def loop(spec: RunSpec, run: Run, start: int, job: Job) -> None:
    """The training loop: forward, backward, clip, step; record loss and time; checkpoint when asked
    or stopped."""
    results, logger, run_dir, progress, signals = (
        job.results,
        job.logger,
        job.run_dir,
        job.progress,
        job.signals,
    )
    t, model, optimizer, scheduler, device = (
        spec.trainer,
        run.model,
        run.optimizer,
        run.scheduler,
        run.device,
    )
    history, step_s = results["loss"]["history"], results["time"]["step_s"]
    tokens_per_step = spec.data.batch_size * spec.data.seq_len * t.grad_accum

    def save_checkpoint(done: int) -> None:
        if run.dctx.enabled:
            # parallel runs are not checkpointed (validate_parallel rejects checkpoint_every /
            # resume)
            return
        path = Path(run_dir) / checkpoint.FILENAME
        checkpoint.save(
            path,
            cfg=spec,
            step=done,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            history=history,
            step_s=step_s,
        )
        results["checkpoint"] = {"path": str(path), "step": done}
        signals.checkpointed_step = done

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    # a bar only on a terminal: redirected to a file (SLURM, nohup, CI) its carriage-return updates
    # pile up as one unreadable line; there the step lines go to the console instead
    show_bar = bool(t.progress) and sys.stderr.isatty()
    bar = tqdm(
        range(start, t.steps),
        disable=not show_bar,
        desc=f"{spec.model.name}/{spec.strategy.name}",
        leave=False,
        initial=start,
        total=t.steps,
    )
    step_lines = StepLines(
        log, t.steps, logging.DEBUG if show_bar else logging.INFO
    )  # train.log gets them
    clock = LoopClock()
    for step in bar:
        began = time.perf_counter()
        progress["step"] = signals.step = step
        micro = [
            tuple(x.to(device, non_blocking=True) for x in run.batches.get(step, m))
            for m in range(t.grad_accum)
        ]
        clock.data_s += time.perf_counter() - began
        try:
            with StepTimer(device) as timer:
                if step == run.probe_step:
                    loss_sum, tracked = probed_train_step(
                        spec, run, micro, progress, where=f"at step {step}"
                    )
                else:
                    loss_sum = train_step(spec, run, micro, progress, where=f"at step {step}")
        except Diverged as e:
            history.append(e.loss)  # keep the failing step's loss in the record
            raise
        loss_val, stop = run.dctx.reduce_step(
            loss_sum, signals.received is not None
        )  # mean over ranks
        history.append(loss_val)
        step_s.append(timer.seconds)
        if step == start:
            record_model_state(run, results)
        if t.stop_on_nan and not math.isfinite(loss_val):
            raise Diverged(f"non-finite loss {loss_val} at step {step}")
        if t.diverge_factor and loss_val > t.diverge_factor * history[0]:
            raise Diverged(
                f"loss {loss_val:.4g} at step {step} exceeds "
                f"trainer.diverge_factor={t.diverge_factor:g} "
                f"x the first loss {history[0]:.4g} (0 switches the rule off)"
            )
        if step == run.probe_step:  # the probe's counts that need no step, on this step's batch
            probed = time.perf_counter()
            memory = memory_of_training_step(
                spec, device, run.policy, run.plan, model, micro[0], tracked
            )
            results["memory"].update(memory)
            clock.probe_s += time.perf_counter() - probed
            log.info(
                "memory probe: %s (%s; on training steps %d-%d, the measured one %s)",
                seconds_text(time.perf_counter() - probed),
                probe_note(results["memory"]),
                step - 1,
                step,
                seconds_text(timer.seconds),
            )
        logged = time.perf_counter()
        tok_s = tokens_per_step / timer.seconds
        if show_bar:
            # drawn on the bar's own clock (mininterval 0.1 s), not per step: a redraw per step
            # cost ~50 us, 0.4% of a `tiny` step (experiments/bench_cli.py); bar off: no call
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if logger.run is not None:  # the metrics (RSS read from /proc) only for a live W&B run
            logger.log(
                {
                    "loss": loss_val,
                    "lr": scheduler.get_last_lr()[0],
                    "step_s": timer.seconds,
                    "tokens_per_s": tok_s,
                    **({} if run.grad_norm is None else {"grad_norm": float(run.grad_norm)}),
                    **step_memory(device),
                },
                step=step,
            )
        step_lines(step, loss_val, timer.seconds, tok_s)
        clock.log_s += time.perf_counter() - logged
        clock.step_s += timer.seconds
        clock.wall_s += time.perf_counter() - began
        clock.iterations += 1
        results["time"]["loop"] = clock.to_dict()
        done = step + 1
        if stop:
            save_checkpoint(done)
            raise Interrupted(
                f"{signals.received or 'a signal on another rank'} after step {done} of {t.steps}; "
                + (
                    "no checkpoint (parallel run)"
                    if run.dctx.enabled
                    else "resume with trainer.resume=true"
                )
            )
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.steps:
            save_checkpoint(done)
    bar.close()


@dataclass
class LoopClock:
    """Where the training loop's wall time goes besides the timed steps (issue 29: data built
    outside the step timer once cost 15% of a `tiny` iteration and showed nowhere). Sums over the
    iterations of this process (a resumed run's earlier ones are not in it)."""

    data_s: float = 0.0  # micro-batches made and moved to the device
    log_s: float = 0.0  # W&B history, progress bar, step lines
    probe_s: float = 0.0  # the memory probe's counts on a training step (its step: in step_s)
    step_s: float = 0.0  # the timed steps (time.step_s)
    wall_s: float = 0.0  # whole iterations
    iterations: int = 0

    def to_dict(self) -> dict:
        wall = self.wall_s
        return {
            "iterations": self.iterations,
            "wall_s": wall,
            "step_s": self.step_s,
            "data_s": self.data_s,
            "log_s": self.log_s,
            "probe_s": self.probe_s,
            # loss sync, divergence checks, the first step's model-state record (not checkpoints)
            "other_s": wall - self.step_s - self.data_s - self.log_s - self.probe_s,
            # the loop's own share: the probe's counts (once per run) are beside it, not in it
            "outside_step": (
                (wall - self.probe_s - self.step_s) / (wall - self.probe_s)
                if wall - self.probe_s > 0
                else None
            ),
        }


def summarize(spec: RunSpec, run: Run, counted: dict, results: dict) -> None:
    """Loss, step-time statistics (warmup steps left out), MFU / HFU and the training run's
    allocator peak."""
    history, step_s = results["loss"]["history"], results["time"]["step_s"]
    t = spec.trainer
    results["loss"].update(first=history[0], final=history[-1])
    tokens_per_step = spec.data.batch_size * spec.data.seq_len * t.grad_accum
    contended = overhead.contention(
        spec
    )  # parallel launcher jobs or CPU ranks timing each other's load
    results["time"].update(contended=contended is not None, contended_reason=contended)
    timed = step_s[t.warmup_steps :]
    model_flops = counted["forward"] + counted["backward"]
    # The dtype the matmuls run in: autocast's, FSDP mixed precision's (bf16_master under fsdp),
    # else the params'.
    compute_dtype = (
        run.policy.autocast_dtype
        or getattr(run.dctx.mp_policy, "param_dtype", None)
        or run.policy.param_dtype
    )
    peak_rate, peak_source = flops.peak_flops(run.device, compute_dtype)
    results["flops"].update(peak_flops_per_s=peak_rate, peak_source=peak_source)
    if run.session is not None:
        results["time"].update(
            compile_s=run.session.first_step_s,
            compile_where=run.session.first_step_where,
            compile_note="wall time of the run's first compiled forward + backward (dynamo "
            "tracing, AOTAutograd partitioning, backend compile, one step); "
            "never part of step_s",
        )
    if not timed:  # every step was a warmup step: no time to report, and no MFU
        results["time"].update(
            warmup_steps=len(step_s),
            tokens_per_step=tokens_per_step,
            reason=f"no step after trainer.warmup_steps={t.warmup_steps} was timed "
            f"({len(step_s)} steps ran): raise trainer.steps or lower warmup_steps",
        )
    else:
        med = statistics.median(timed)
        results["time"].update(
            step_s_median=med,
            step_s_p90=percentile(timed, 0.9),
            tokens_per_s=tokens_per_step / med,
            warmup_steps=len(step_s) - len(timed),
            tokens_per_step=tokens_per_step,
        )
        if counted["recompute"] is None:  # HFU needs the recompute FLOPs
            results["flops"].update(
                mfu=flops.utilization(model_flops, 0, med, peak_rate)["mfu"], hfu=None
            )
        else:
            results["flops"].update(
                flops.utilization(model_flops, counted["recompute"], med, peak_rate),
                achieved_flops_per_s=(model_flops + counted["recompute"]) / med,
            )
    peak = cuda_peak_bytes(run.device)
    if peak is not None:
        # The probe's peak (same step as the prediction) stays in `measured`; this is the whole
        # training run's.
        results["memory"]["peak_bytes"].update(
            training_allocated=peak["allocated"], training_reserved=peak["reserved"]
        )


def measure_overhead(spec: RunSpec, run: Run, job: Job) -> None:
    """time.overhead: this run's training step against the baseline strategy's, paired
    (recompute_lab.measure.overhead)."""
    results, signals = job.results, job.signals
    job.progress.update(step=None, phase="overhead")
    scratch: dict = {}  # train_step's phase reports: the failure record keeps phase "overhead"
    results["time"]["overhead"] = overhead.measure(
        spec,
        run,
        lambda model, micro: train_step(spec, run, micro, scratch, model, "(overhead)"),
        should_stop=lambda: signals.received is not None,
        training_s=(results["time"].get("loop") or {}).get("wall_s"),
    )


def train(
    spec: RunSpec,
    job: Job,
    dctx: Optional[distributed.DistContext] = None,
    resume: Optional[tuple[Path, dict]] = None,
) -> None:
    """Every step of a run; fills ``job.results`` in place as it goes (``job.progress``: step and
    phase now)."""
    results, run_dir, signals = job.results, job.run_dir, job.signals
    dctx = dctx or distributed.DistContext()
    run = build(spec, results, run_dir, dctx, share_probe=resume is None)
    try:
        laps = Laps(log)
        counted = count_flops(spec, run, results)
        laps("FLOP count on meta", flops_note(results["flops"]))
        start = restore(run, results, resume)
        if start:
            laps("resume", f"from step {start}")
        signals.checkpointed_step = start if resume else None
        signals.immediate = False  # from here a signal finishes the step and checkpoints
        log.info(
            "training: steps %d..%d of %d, %s tokens per step",
            start + 1,
            spec.trainer.steps,
            spec.trainer.steps,
            f"{spec.data.batch_size * spec.data.seq_len * spec.trainer.grad_accum:,}",
        )
        laps.reset()
        loop(spec, run, start, job)
        laps("training", f"{spec.trainer.steps - start} steps")
        summarize(spec, run, counted, results)
        tm = results["time"]
        if tm.get("step_s_median") is not None:
            log.info(
                "step time median %.4f s (p90 %.4f s), %s tokens/s",
                tm["step_s_median"],
                tm["step_s_p90"],
                f"{tm['tokens_per_s']:,.0f}",
            )
        else:
            log.info("step time: none (%s)", tm.get("reason") or "no timed step")
        measure_overhead(spec, run, job)
        laps("paired overhead", overhead_note(results["time"].get("overhead") or {}))
        if dctx.enabled:
            dctx.report(
                spec, results
            )  # per-rank figures gathered on rank 0 (a collective: every rank calls it)
    finally:
        if run.probe_step is not None:
            # MemTracker leaves the parameters of the model it tracked referenced from
            # autograd's C++ side (recompute_lab.measure.memory.release_parameters): the run
            # is over, free them, as the probe frees its fresh model's
            release_parameters(run.model)


def preflight(spec: RunSpec, run_dir: Path) -> Optional[tuple[Path, dict]]:
    """What can refuse a valid spec before anything is written or started: the overhead's baseline
    and the resume
    checkpoint (located, verified and matched to the spec; the config's rules were checked by
    RunSpec.of).
    Returns (path, state) of the checkpoint to resume from, or None."""
    overhead.check_config(
        spec
    )  # trainer.overhead (its baseline strategy) before the run, not after training
    if spec.trainer.memory_snapshot and not spec.trainer.probe:
        raise ConfigError(
            "trainer.memory_snapshot=true records the probe step: it needs trainer.probe=true"
        )
    device = resolve_device(spec.trainer.device)
    if spec.trainer.memory_snapshot and device.type != "cuda":
        # refused rather than noted: a researcher who asked for the snapshot would otherwise find
        # a finished run without the file it was run for
        raise ConfigError(
            "trainer.memory_snapshot=true records the CUDA caching allocator's history "
            f"(memory_snapshot.pickle), but this run's device is {device.type}; valid here: "
            "trainer.memory_snapshot=false (or run on a CUDA device, trainer.device=cuda)"
        )
    path = checkpoint.locate(spec.trainer.resume, run_dir)
    return None if path is None else (path, checkpoint.load(path, spec))


def run(
    spec: RunSpec,
    run_dir: Path,
    group: Optional[str] = None,
    on_start: Optional[Callable[[], None]] = None,
) -> dict:
    """Train per ``spec``, keep ``run_dir/results.json`` true whatever happens, and return the
    results.

    ``spec`` is a RunSpec, or a composed Hydra config that recompute_lab.config.spec turns into one
    here (so an
    invalid one is refused with a record, as below). Refused before starting (ConfigError raised;
    see
    recompute_lab.record.folder for what is written): an invalid config, strategy option or resume
    checkpoint, a
    folder another process runs in, a folder holding a finished run. Once started, a ``running``
    record is
    written at once and replaced by the final one; out of memory, divergence and interruption end
    the run with
    their status and return normally, so a sweep goes on. When the folder cannot take the final
    record, it goes beside the folder or to stderr (RunFolder.finish) and RecordNotSaved is raised
    after everything else has finished. ``on_start`` is called once the folder's checks have
    passed and the running record is written (the CLI releases the held train.log and writes
    .hydra/*.yaml then).
    """
    run_dir = Path(run_dir)
    # what an earlier job of this process freed (Hydra runs a sweep's jobs in one process)
    release_host_memory()
    given = spec
    results = new_results(plain_config(given))
    whole, laps = Laps(log), Laps(log)
    dctx = distributed.DistContext.from_env(
        given
    )  # rank 0 of 1 unless started by torchrun / submitit
    folder = RunFolder(run_dir, write=dctx.is_main)  # rank 0 owns the output dir
    progress: dict = {"step": None, "phase": "setup"}
    exit_code = 0
    with SignalFlag() as signals:
        try:
            folder.acquire()
            spec = RunSpec.of(given)  # model=hf resolved, rules checked, typed and frozen
            results["config"] = (
                spec.to_dict()
            )  # as resolved (model=hf: the Hugging Face model's fields)
            resume = preflight(spec, run_dir)
        except ConfigError as e:
            results.update(status="error", error=f"invalid configuration: {e}")
            if not isinstance(e, FolderBusy):
                folder.refused(results)
            folder.release()
            raise
        except BaseException as e:
            # a signal or a failure while the spec is checked: nothing started, so it is recorded
            # as a refusal is (only into a folder with no record), never left unrecorded
            interrupted = isinstance(e, KeyboardInterrupt)
            results.update(
                status="interrupted" if interrupted else "error",
                error=str(e) or type(e).__name__,
            )
            if not interrupted:
                results["traceback"] = traceback.format_exc()
            folder.refused(results)
            folder.release()
            raise
        log.info(
            "run: model %s, precision %s, strategy %s, batch %s x seq %s, %s steps -> %s",
            spec.model.name,
            spec.precision.name,
            spec.strategy.name,
            spec.data.batch_size,
            spec.data.seq_len,
            spec.trainer.steps,
            run_dir,
        )
        # Everything from the first record on is inside the protected region: a signal or a failure
        # while the running record or the W&B run starts still ends with a final record.
        logger: Optional[RunLogger] = None
        try:
            folder.start(results)
            if on_start is not None:  # the CLI: train.log and .hydra/*.yaml, not before now
                on_start()
            # one W&B run: rank 0's
            logger = RunLogger(distributed.logger_cfg(spec, dctx), run_dir, group)
            laps(f"W&B run ({logger.mode})")
            train(spec, Job(results, logger, run_dir, progress, signals), dctx, resume)
            results["status"] = "ok"
        except ConfigError as e:
            results.update(status="error", error=f"invalid configuration: {e}")
            exit_code = 1
            raise
        except Diverged as e:
            results.update(status="diverged", error=str(e), failure=dict(progress))
            exit_code = 1
        except (Interrupted, KeyboardInterrupt) as e:
            results.update(
                status="interrupted", error=str(e) or "KeyboardInterrupt", failure=dict(progress)
            )
            exit_code = 1
        except Exception as e:
            exit_code = 1
            if not is_oom(e):
                results.update(
                    status="error",
                    error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc(),
                    failure=dict(progress),
                )
                raise
            results.update(
                status="oom",
                error=str(e).splitlines()[0] if str(e) else "out of memory",
                failure={**progress, "strategy": spec.strategy.name, **oom_report()},
            )
        finally:
            signals.closing = True  # a signal now must not cut the final record short
            results["logger"] = (
                {"mode": logger.mode, "note": logger.note}
                if logger is not None
                else {"mode": "disabled", "note": "the run ended before its W&B run started"}
            )
            # The record first, then what is optional (W&B): a failing W&B cannot cost the record.
            lost = folder.finish(results)
            folder.release()
            if logger is not None:
                logger.summarize(results, format_summary(results))
                logger.finish(exit_code)
            whole(
                f"run {results['status']}" + (f" ({results.get('error')})" if exit_code else ""),
                f"results.json and W&B ({logger.mode if logger else 'not started'}) in {run_dir}",
            )
            dctx.close()
            if exit_code:
                gc.collect()  # free the failed run's tensors before the next job of a sweep
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    if lost:
        raise RecordNotSaved(lost)
    return results


def release_host_memory() -> None:
    """Collect garbage and hand the freed heap back to the OS (glibc's malloc_trim; a no-op
    elsewhere): glibc keeps
    freed blocks in its arenas, so without it an in-process sweep's resident memory grew by about a
    model's size per
    job although no tensor of the earlier jobs was alive (small, 12 jobs: 0.65 -> 1.6 GB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps what it keeps
        pass


def probe_note(memory: dict) -> str:
    """One line on what the memory probe measured (for the log)."""
    act, peak = memory.get("activation_bytes") or {}, memory.get("peak_bytes") or {}
    if act.get("measured") is None:
        return "no measurement" + (
            f": {memory['probe_error']}" if memory.get("probe_error") else ""
        )
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f} MB"
    return (
        f"activations {mb(act['measured'])} saved (predicted {mb(act.get('predicted'))}), "
        f"peak {mb(peak.get('measured'))} ({peak.get('source') or 'n/a'})"
    )


def flops_note(fl: dict) -> str:
    ps = fl["per_step"]
    if (
        ps["recompute"] is None
    ):  # a compiled run whose graphs are not counted (flops.recompute_reason says why)
        return (
            f"forward {ps['forward'] / 1e9:.3g} GFLOP, backward {ps['backward'] / 1e9:.3g}, "
            f"recompute not "
            f"counted: {fl.get('recompute_reason')}"
        )
    return (
        f"forward {ps['forward'] / 1e9:.3g} GFLOP, backward {ps['backward'] / 1e9:.3g}, recompute "
        f"{ps['recompute'] / 1e9:.3g} (+{fl['recompute_overhead']:.1%})"
    )


def overhead_note(ovh: dict) -> str:
    """One line on the paired time overhead (for the log): 'step time vs none: +11.6% (95% CI ...),
    14 rounds'."""
    if ovh.get("skipped") or ovh.get("ratio") is None:
        return f"skipped: {ovh.get('skipped') or 'not measured'}"
    return (
        f"step time vs {ovh.get('baseline')}: "
        f"{describe(ovh['ratio'], ovh.get('ci95_low'), ovh.get('ci95_high'))}, "
        f"{ovh.get('rounds')} rounds"
    )

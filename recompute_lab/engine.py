"""One training run from a composed config: build, apply the strategy, train, measure, record.

``run(cfg, run_dir)`` is everything ``python -m recompute_lab.train`` does after Hydra composes the config.
It always leaves one results.json in ``run_dir`` (status ok | oom | diverged | interrupted | error) and always
finishes its W&B run.
"""
from __future__ import annotations

import gc
import math
import signal
import statistics
import threading
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from recompute_lab import checkpoint
from recompute_lab import distributed
from recompute_lab import flops as flops_mod
from recompute_lab import theory
from recompute_lab.config import ConfigError, Device, validate
from recompute_lab.measure import StepTimer, cuda_peak_bytes, model_state_bytes
from recompute_lab.model import build_model
from recompute_lab.precision import make_precision
from recompute_lab.probe import memory_probe
from recompute_lab.strategies import apply_strategy
from recompute_lab.tracking import env_info, format_summary, new_results, write_json_atomic
from recompute_lab.wandb_logger import RunLogger


def resolve_device(name: str) -> torch.device:
    if name == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but CUDA is not available on this machine; "
                          "valid here: auto, cpu")
    if name == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def lr_lambda(ocfg: DictConfig, total_steps: int):
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


class Diverged(RuntimeError):
    """Non-finite loss or gradients (trainer.stop_on_nan)."""


class PredictedOOM(torch.OutOfMemoryError):
    """trainer.max_memory_gb: the predicted peak does not fit, so nothing is allocated."""


EAGER_SCORES_WARN_BYTES = 2**30  # one layer's (b, h, s, s) fp32 scores above 1 GiB: say so


def guard_memory(cfg: DictConfig, policy, device: torch.device, results: dict) -> None:
    """Predict the step's peak on a meta replica and refuse the run (status oom) if it exceeds the guard."""
    from recompute_lab.estimate import meta_saved_tensors
    from recompute_lab.probe import predicted_memory

    m = cfg.model
    scores = cfg.data.batch_size * m.n_head * cfg.data.seq_len ** 2 * 4
    if m.attention == "eager" and scores > EAGER_SCORES_WARN_BYTES:
        warnings.warn(f"attention=eager stores (b, h, s, s) scores: {scores / 2**30:.1f} GiB per layer at "
                      f"seq_len {cfg.data.seq_len}; attention=sdpa or +strategy=selective avoid most of it",
                      stacklevel=2)
    limit = cfg.trainer.max_memory_gb
    if limit is None:
        return
    meta = build_model(m, "meta", policy.param_dtype).train()
    plan = apply_strategy(meta, cfg.strategy)
    pred = predicted_memory(cfg, policy, plan, meta.get_num_params(), device.type)
    act = pred["activations"]
    if act.get("total") is None:  # no closed form for this plan: count its saved tensors on the meta replica
        counted = meta_saved_tensors(meta, cfg.data.batch_size, cfg.data.seq_len, device.type)
        act = {"total": counted["total"], "largest_region": 0}
    peak = theory.predict_peak(m, pred["setting"], pred["model_state"], act)
    total = peak["total"] if peak else pred["model_state"]["total"] + act["total"]
    results["memory"]["guard"] = {"max_memory_gb": limit, "predicted_peak_bytes": total}
    if total > limit * 1e9:
        raise PredictedOOM(f"predicted peak {total / 1e9:.3f} GB exceeds trainer.max_memory_gb={limit}; "
                           f"nothing was allocated (try a recomputation strategy, a smaller batch or seq_len)")


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


def train(cfg: DictConfig, results: dict, logger: RunLogger, run_dir: Path, progress: dict,
          signals: "SignalFlag", dctx: Optional[distributed.DistContext] = None) -> None:
    """The training loop proper; fills ``results`` in place as it goes (``progress``: step and phase now)."""
    validate(cfg)
    t = cfg.trainer
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    dctx = dctx or distributed.DistContext()
    device = dctx.setup(cfg, resolve_device(t.device))  # joins the process group under torchrun
    install_oom_observer()
    policy = dctx.adapt_precision(make_precision(cfg.precision))
    results["env"] = env_info(device, policy.param_dtype)
    torch.manual_seed(t.seed)
    batches = dctx.batches(cfg.data, cfg.model.vocab_size)  # this rank's rows of the global batch
    guard_memory(cfg, policy, device, results)
    if t.memory_snapshot and not t.probe:
        raise ConfigError("trainer.memory_snapshot=true records the probe step: it needs trainer.probe=true")
    if t.probe:  # memory probe on a fresh model, before the training model exists (recompute_lab.probe)
        snapshot = Path(run_dir) / "memory_snapshot.pickle" if t.memory_snapshot and run_dir is not None else None
        probe_batch = tuple(x.to(device) for x in batches.get(0, 0))
        results["memory"].update(memory_probe(cfg, device, policy, probe_batch, snapshot))
    model = build_model(cfg.model, device, policy.param_dtype)
    results["strategy"] = apply_strategy(model, cfg.strategy)
    n_params = model.get_num_params()
    results["model"] = {"params": n_params, "non_embedding_params": model.get_num_params(non_embedding=True),
                        "n_layer": cfg.model.n_layer, "d_model": cfg.model.d_model, "n_head": cfg.model.n_head,
                        "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size,
                        "grad_accum": t.grad_accum, "name": cfg.model.name}
    # FLOPs: counted on a meta replica (no memory, no effect on the timed steps) and predicted analytically.
    counted = flops_mod.count_step_flops(cfg, policy.param_dtype)
    predicted_flops = flops_mod.predict_step_flops(cfg, results["strategy"])
    results["flops"].update(
        per_step={k: counted[k] for k in ("forward", "backward", "recompute")},
        predicted_per_step=predicted_flops,
        recompute_overhead=counted["recompute"] / (counted["forward"] + counted["backward"]),
        by_op={"forward": counted["forward_by_op"], "backward": counted["backward_by_op"]},
        method=counted["method"])
    model = dctx.wrap(model)  # DDP / FSDP2 after the recomputation wrappers (torchtitan's order)
    optimizer = policy.build_optimizer(model, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optimizer, t.steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * t.grad_accum
    history, step_s = results["loss"]["history"], results["time"]["step_s"]
    start = 0
    ckpt_path = Path(run_dir) / checkpoint.FILENAME
    resume_from = checkpoint.locate(t.resume, run_dir)
    if resume_from is not None:
        state = checkpoint.load(resume_from, cfg)
        checkpoint.restore(state, model, optimizer, scheduler)
        start = state["step"]
        history.extend(state["history"])
        step_s.extend(state["step_s"])
        results["resumed_from"] = {"path": str(resume_from), "step": start}

    def save_checkpoint(done: int) -> None:
        if dctx.enabled:
            return  # parallel runs are not checkpointed (validate_parallel rejects checkpoint_every / resume)
        checkpoint.save(ckpt_path, cfg=cfg, step=done, model=model, optimizer=optimizer, scheduler=scheduler,
                        history=history, step_s=step_s)
        results["checkpoint"] = {"path": str(ckpt_path), "step": done}

    model.train()
    bar = tqdm(range(start, t.steps), disable=not t.progress, desc=f"{cfg.model.name}/{cfg.strategy.name}",
               leave=False, initial=start, total=t.steps)
    for step in bar:
        progress["step"] = step
        micro = [tuple(x.to(device, non_blocking=True) for x in batches.get(step, m)) for m in range(t.grad_accum)]
        with StepTimer(device) as timer:
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for idx, targets in micro:
                progress["phase"] = "forward"
                with policy.autocast(device.type):
                    loss = model(idx, targets) / t.grad_accum
                progress["phase"] = "backward"
                loss.backward()
                loss_sum += loss.detach()
            progress["phase"] = "optimizer"
            grad_norm = None
            if cfg.optimizer.grad_clip > 0:
                grad_norm = policy.clip_grad_norm(model, optimizer, cfg.optimizer.grad_clip)
            if t.stop_on_nan and grad_norm is not None and not torch.isfinite(grad_norm):
                history.append(loss_sum.item())  # keep the failing step's loss in the record
                raise Diverged(f"non-finite gradient norm {grad_norm.item()} at step {step}")
            optimizer.step()
            scheduler.step()
        loss_val, stop = dctx.reduce_step(loss_sum, signals.received is not None)  # mean over ranks
        history.append(loss_val)
        step_s.append(timer.seconds)
        if step == start:
            # Model state right after the first optimizer step: params, grads and every optimizer buffer exist.
            measured = model_state_bytes(model, optimizer)
            predicted = theory.model_state_bytes_sharded(n_params, policy.name, policy.fp32_grad_accum,
                                                         dctx.kind, dctx.world_size)
            ms = results["memory"]["model_state_bytes"]
            ms.update(predicted=predicted["total"], measured=measured["total"], per_param=measured["per_param"],
                      predicted_per_param=predicted["per_param"], dtypes=measured["dtypes"],
                      bytes_per_param={"predicted": predicted["bytes_per_param"],
                                       "measured": measured["bytes_per_param"]})
        if t.stop_on_nan and not math.isfinite(loss_val):
            raise Diverged(f"non-finite loss {loss_val} at step {step}")
        tok_s = tokens_per_step / timer.seconds
        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tok_s:,.0f}")
        logger.log({"loss": loss_val, "lr": scheduler.get_last_lr()[0], "step_s": timer.seconds,
                    "tokens_per_s": tok_s}, step=step)
        done = step + 1
        if stop:
            save_checkpoint(done)
            raise Interrupted(f"{signals.received or 'a signal on another rank'} after step {done} of {t.steps}; "
                              + ("no checkpoint (parallel run)" if dctx.enabled else "resume with trainer.resume=true"))
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.steps:
            save_checkpoint(done)
    bar.close()

    results["loss"].update(first=history[0], final=history[-1])
    timed = step_s[t.warmup_steps:] if len(step_s) > t.warmup_steps else step_s
    med = statistics.median(timed)
    results["time"].update(step_s_median=med, step_s_p90=percentile(timed, 0.9), tokens_per_s=tokens_per_step / med,
                           warmup_steps=len(step_s) - len(timed), tokens_per_step=tokens_per_step)
    model_flops = counted["forward"] + counted["backward"]
    # The dtype the matmuls run in: autocast's, FSDP mixed precision's (bf16_master under fsdp), else the params'.
    compute_dtype = policy.autocast_dtype or getattr(dctx.mp_policy, "param_dtype", None) or policy.param_dtype
    peak_rate, peak_source = flops_mod.peak_flops(device, compute_dtype)
    results["flops"].update(flops_mod.utilization(model_flops, counted["recompute"], med, peak_rate),
                            peak_flops_per_s=peak_rate, peak_source=peak_source,
                            achieved_flops_per_s=(model_flops + counted["recompute"]) / med)
    peak = cuda_peak_bytes(device)
    if peak is not None:
        # The probe's peak (same step as the prediction) stays in `measured`; this is the whole training run's.
        results["memory"]["peak_bytes"].update(training_allocated=peak["allocated"], training_reserved=peak["reserved"])
    if dctx.enabled:
        dctx.report(cfg, results)  # per-rank figures gathered on rank 0 (a collective: every rank calls it)


def run(cfg: DictConfig, run_dir: Path, group: Optional[str] = None) -> dict:
    """Train per ``cfg``, write ``run_dir/results.json`` whatever happens, and return the results.

    Invalid configurations raise ConfigError (after results.json records status "error"); out of memory,
    divergence and interruption end the run with their status and return normally, so a sweep goes on.
    """
    run_dir = Path(run_dir)
    results = new_results(cfg)
    dctx = distributed.DistContext.from_env(cfg)  # rank 0 of 1 unless started by torchrun / submitit
    logger = RunLogger(distributed.logger_cfg(cfg, dctx), run_dir, group)  # one W&B run: rank 0's
    progress: dict = {"step": None, "phase": "setup"}
    exit_code = 0
    with SignalFlag() as signals:
        try:
            train(cfg, results, logger, run_dir, progress, signals, dctx)
            results["status"] = "ok"
        except ConfigError as e:
            results.update(status="error", error=f"invalid configuration: {e}")
            exit_code = 1
            raise
        except torch.OutOfMemoryError as e:
            results.update(status="oom", error=str(e).splitlines()[0] if str(e) else "out of memory",
                           failure={**progress, "strategy": cfg.strategy.name, **_oom_report()})
            exit_code = 1
        except Diverged as e:
            results.update(status="diverged", error=str(e), failure=dict(progress))
            exit_code = 1
        except (Interrupted, KeyboardInterrupt) as e:
            results.update(status="interrupted", error=str(e) or "KeyboardInterrupt", failure=dict(progress))
            exit_code = 1
        except Exception as e:
            results.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                           failure=dict(progress))
            exit_code = 1
            raise
        finally:
            results["logger"] = {"mode": logger.mode, "note": logger.note}
            if dctx.is_main:  # rank 0 owns the output dir
                write_json_atomic(run_dir / "results.json", results)
            logger.summarize(results, format_summary(results))
            logger.finish(exit_code)
            dctx.close()
            if exit_code:
                gc.collect()  # free the failed run's tensors before the next job of a sweep
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return results


_OOM_SEEN: dict = {}  # filled by the CUDA allocator's OOM observer at the moment of failure


def install_oom_observer() -> None:
    """Once per process on CUDA: record torch_remat's saved-tensor report when the allocator runs out.

    The report is taken inside the allocator callback, while the autograd graph that holds the saved tensors is
    still alive; by the time the exception reaches run() the frames that owned it are gone.
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


def _oom_report() -> dict:
    """What was resident when memory ran out (CUDA): allocator figures and the saved-tensor report."""
    if not torch.cuda.is_available():
        return {}
    out = {"cuda_allocated": torch.cuda.memory_allocated(), "cuda_max_allocated": torch.cuda.max_memory_allocated()}
    out.update(_OOM_SEEN.pop("last", {}))
    return out

"""One training run from a composed config: build, apply the strategy, train, measure, record.

``run(cfg, run_dir)`` is everything ``python -m recompute_lab.train`` does after Hydra composes the config.
It always leaves one results.json in ``run_dir`` (status ok | oom | diverged | interrupted | error) and always
finishes its W&B run.
"""
from __future__ import annotations

import math
import statistics
import traceback
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from recompute_lab import theory
from recompute_lab.config import ConfigError, Device, validate
from recompute_lab.data import Batches
from recompute_lab.measure import StepTimer, cuda_peak_bytes, model_state_bytes
from recompute_lab.model import build_model
from recompute_lab.precision import make_precision
from recompute_lab.probe import memory_probe
from recompute_lab.strategies import apply_strategy
from recompute_lab.tracking import RunLogger, env_info, new_results, write_json_atomic


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
    pass


def train(cfg: DictConfig, results: dict, logger: RunLogger, run_dir: Optional[Path] = None) -> None:
    """The training loop proper; fills ``results`` in place as it goes."""
    validate(cfg)
    t = cfg.trainer
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    device = resolve_device(t.device)
    policy = make_precision(cfg.precision)
    results["env"] = env_info(device, policy.param_dtype)
    torch.manual_seed(t.seed)
    batches = Batches(cfg.data, cfg.model.vocab_size)
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
    optimizer = policy.build_optimizer(model, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optimizer, t.steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * t.grad_accum
    history, step_s = results["loss"]["history"], results["time"]["step_s"]
    model.train()
    bar = tqdm(range(t.steps), disable=not t.progress, desc=f"{cfg.model.name}/{cfg.strategy.name}", leave=False)
    for step in bar:
        micro = [tuple(x.to(device, non_blocking=True) for x in batches.get(step, m)) for m in range(t.grad_accum)]
        with StepTimer(device) as timer:
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for idx, targets in micro:
                with policy.autocast(device.type):
                    loss = model(idx, targets) / t.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if cfg.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
            optimizer.step()
            scheduler.step()
        loss_val = loss_sum.item()
        history.append(loss_val)
        step_s.append(timer.seconds)
        if step == 0:
            # Model state right after the first optimizer step: params, grads and every optimizer buffer exist.
            measured = model_state_bytes(model, optimizer)
            predicted = theory.model_state_bytes(n_params, policy.name, getattr(policy, "fp32_grad_accum", False))
            ms = results["memory"]["model_state_bytes"]
            ms.update(predicted=predicted["total"], measured=measured["total"], per_param=measured["per_param"],
                      predicted_per_param=predicted["per_param"], dtypes=measured["dtypes"],
                      bytes_per_param={"predicted": predicted["bytes_per_param"],
                                       "measured": measured["bytes_per_param"]})
        if not math.isfinite(loss_val):
            raise Diverged(f"non-finite loss {loss_val} at step {step}")
        tok_s = tokens_per_step / timer.seconds
        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tok_s:,.0f}")
        logger.log({"loss": loss_val, "lr": scheduler.get_last_lr()[0], "step_s": timer.seconds,
                    "tokens_per_s": tok_s}, step=step)
    bar.close()

    results["loss"].update(first=history[0], final=history[-1])
    timed = step_s[t.warmup_steps:] if len(step_s) > t.warmup_steps else step_s
    med = statistics.median(timed)
    results["time"].update(step_s_median=med, step_s_p90=percentile(timed, 0.9), tokens_per_s=tokens_per_step / med,
                           warmup_steps=len(step_s) - len(timed), tokens_per_step=tokens_per_step)
    peak = cuda_peak_bytes(device)
    if peak is not None:
        results["memory"]["peak_bytes"].update(measured=peak["allocated"], reserved=peak["reserved"],
                                               source="cuda_allocator")


def run(cfg: DictConfig, run_dir: Path, group: Optional[str] = None) -> dict:
    """Train per ``cfg``, write ``run_dir/results.json`` whatever happens, and return the results."""
    run_dir = Path(run_dir)
    results = new_results(cfg)
    logger = RunLogger(cfg, run_dir, group)
    exit_code = 0
    try:
        train(cfg, results, logger, run_dir)
        results["status"] = "ok"
    except ConfigError as e:
        results.update(status="error", error=f"invalid configuration: {e}")
        exit_code = 1
        raise
    except torch.OutOfMemoryError as e:
        results.update(status="oom", error=str(e).splitlines()[0])
        exit_code = 1
    except Diverged as e:
        results.update(status="diverged", error=str(e))
        exit_code = 1
    except KeyboardInterrupt:
        results.update(status="interrupted", error="KeyboardInterrupt")
        exit_code = 1
        raise
    except Exception as e:
        results.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        exit_code = 1
        raise
    finally:
        results["logger"] = {"mode": logger.mode, "note": logger.note}
        write_json_atomic(run_dir / "results.json", results)
        logger.summarize(results)
        logger.finish(exit_code)
    return results

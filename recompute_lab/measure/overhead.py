"""The in-run time overhead (results.json ``time.overhead``) and the conditions the run's times were
taken under.

``measure`` runs after training (engine.train): a second model with the baseline strategy
(``trainer.overhead``:
default ``none``) is built on the meta device and given the training model's own parameter and
buffer tensors
(shared, not copied: no second model state in memory, and both arms compute with the same weights
and the same
optimizer), so the arms differ only in how they recompute. Both then run the whole training step
(forward,
backward, clip, optimizer and scheduler step) in interleaved ABBA rounds on the same batches, timed
like the
training loop (CUDA events on GPU, perf_counter on CPU), and recompute_lab.measure.timing gives the
median ratio with its
95% interval. The extra optimizer steps come after the run's loss history, model-state measurement
and
checkpoints: nothing else in results.json sees them.

Skipped, with the reason in ``time.overhead.skipped``: switched off; a parallel run (DDP / FSDP wrap
the one
model); a baseline predicted not to fit (the memory guard's prediction against
``trainer.max_memory_gb``, else the
device's memory); a baseline that runs out of memory or diverges anyway. When the run's
strategy is the baseline the ratio is 1 by definition (rounds 0), unless the run is compiled: the
baseline is
eager, so compiled `none` is timed against eager `none`.

``contention`` says why a run's times are not to be trusted: several jobs of a parallel launcher
(joblib,
submitit's local executor) or several torchrun ranks sharing one machine's CPU cores.

Layer: measure.
"""

from __future__ import annotations

import gc
import os
from typing import Any, Callable, Optional

import torch

from recompute_lab.config import ConfigError, Device
from recompute_lab.config.spec import RunSpec
from recompute_lab.run.failures import Diverged, is_oom
from recompute_lab.measure.memory import StepTimer
from recompute_lab.model.gpt import build_model
from recompute_lab.measure.probe import PredictedOOM, guard_memory
from recompute_lab.strategies import apply_strategy, parse_options
from recompute_lab.measure.timing import MIN_ROUNDS_FOR_CI, run_paired

KEYS = ("baseline", "ratio", "ci95_low", "ci95_high", "rounds", "method")


def check_config(cfg: RunSpec) -> None:
    """trainer.overhead's rules, checked before anything runs (a typo'd baseline must not waste a
    run)."""
    o = cfg.trainer.overhead
    if o is None:
        return
    parse_options({"name": o.baseline})  # ConfigError naming the valid strategies
    if o.min_rounds < 1 or o.max_rounds < o.min_rounds:
        raise ConfigError(
            f"trainer.overhead: need 1 <= min_rounds ({o.min_rounds}) <= max_rounds "
            f"({o.max_rounds})"
        )
    if min(o.target_ci_width, o.max_seconds, o.warmup_rounds, o.budget_fraction) < 0 or (
        o.min_seconds < 0
    ):
        raise ConfigError(
            "trainer.overhead: target_ci_width, max_seconds, warmup_rounds, budget_fraction and "
            "min_seconds must be >= 0"
        )


def empty(baseline: Optional[str], reason: Optional[str]) -> dict:
    """time.overhead with every key present and nothing measured (``skipped`` says why)."""
    return {**dict.fromkeys(KEYS), "baseline": baseline, "rounds": 0, "skipped": reason}


def baseline_config(cfg: RunSpec, baseline) -> RunSpec:
    """``cfg`` with the baseline's strategy options in place of the run's."""
    return cfg.replace(strategy=baseline)


def fit_reason(cfg: RunSpec, run, baseline) -> Optional[str]:
    """Why the baseline would not fit, by the memory guard's prediction
    (recompute_lab.measure.probe.guard_memory: against
    trainer.max_memory_gb, else the device's memory), or None. The model state is shared, so the
    baseline needs
    what a run of its own would."""
    try:
        guard_memory(baseline_config(cfg, baseline), run.policy, run.device, {"memory": {}})
    except PredictedOOM as e:
        return f"baseline {baseline.name} would not fit: {e}"
    return None


def share_tensors(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Make every parameter and buffer of ``dst`` (a meta replica) the very tensor ``src`` holds
    under that name."""
    for kind, items in (
        ("_parameters", src.named_parameters(remove_duplicate=False)),
        ("_buffers", src.named_buffers(remove_duplicate=False)),
    ):
        for name, tensor in items:
            owner, _, leaf = name.rpartition(".")
            getattr(dst.get_submodule(owner), kind)[leaf] = tensor
    left = [n for n, t in [*dst.named_parameters(), *dst.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"baseline replica has tensors the training model does not: {left[:5]}")


def build_baseline(cfg: RunSpec, policy, trained: torch.nn.Module, baseline) -> torch.nn.Module:
    """The baseline model: ``trained``'s tensors (built under ``policy``), the baseline's
    recomputation wrappers."""
    model = build_model(cfg.model, "meta", policy.param_dtype)
    share_tensors(model, trained)
    apply_strategy(model, baseline, cfg.shape())
    return model.train()


def wall_budget(o, training_s: Optional[float]) -> Optional[float]:
    """The measurement's wall-time cap (None: none): ``max_seconds``, and ``budget_fraction`` x the
    training loop's wall time but at least ``min_seconds``, whichever is smaller."""
    caps = [o.max_seconds] if o.max_seconds > 0 else []
    if training_s is not None and o.budget_fraction > 0:
        caps.append(max(o.min_seconds, o.budget_fraction * training_s))
    return min(caps) if caps else None


def measure(
    cfg: RunSpec,
    run,
    train_step: Callable[[torch.nn.Module, list], object],
    should_stop: Optional[Callable[[], bool]] = None,
    training_s: Optional[float] = None,
) -> dict:
    """time.overhead for this run: its step against the baseline's, paired and interleaved.

    ``training_s``: the training loop's wall time; the measurement gets at most
    ``budget_fraction`` x that (never under ``min_seconds``) besides the ``max_seconds`` cap.

    ``train_step(model, micro)`` runs one full training step of ``model`` on the micro-batches
    ``micro``
    (engine.train_step with the run's optimizer and scheduler).
    """
    o = cfg.trainer.overhead
    baseline = parse_options({"name": o.baseline})
    label = str(o.baseline)
    if not o.enabled:
        return empty(label, "trainer.overhead.enabled=false")
    if run.dctx.enabled:
        return empty(
            label, f"parallel={run.dctx.kind}: the paired measurement runs in one process only"
        )
    compiled = getattr(run, "session", None) is not None  # the baseline always runs eagerly
    if parse_options(cfg.strategy) == baseline and not compiled:
        return {
            **empty(label, None),
            "ratio": 1.0,
            "ci95_low": 1.0,
            "ci95_high": 1.0,
            "method": "the run's strategy is the baseline: ratio 1 by definition",
        }
    reason = fit_reason(cfg, run, baseline)
    if reason:
        return empty(label, reason)
    device, t = run.device, cfg.trainer
    cache: dict[int, list] = {}

    def batch(
        i: int,
    ) -> list:  # the same micro-batches for both arms of a round, fetched outside the timer
        if i not in cache:
            cache.clear()
            step = t.steps + o.warmup_rounds + i  # batches the run did not train on
            cache[i] = [
                tuple(x.to(device, non_blocking=True) for x in run.batches.get(step, m))
                for m in range(t.grad_accum)
            ]
        return cache[i]

    def arm(model: torch.nn.Module) -> Callable[[int], float]:
        def step(i: int) -> float:
            micro = batch(i)
            with StepTimer(device) as timer:
                train_step(model, micro)
            return timer.seconds

        return step

    limit = wall_budget(o, training_s)
    other = None
    try:
        other = build_baseline(cfg, run.policy, run.model, baseline)
        paired = run_paired(
            arm(run.model),
            arm(other),
            min_rounds=o.min_rounds,
            max_rounds=o.max_rounds,
            target_rel_width=o.target_ci_width,
            max_seconds=limit,
            warmup_rounds=o.warmup_rounds,
            should_stop=should_stop,
        )
    except Diverged as e:
        return empty(label, f"a step diverged during the measurement: {e}")
    except (
        Exception
    ) as e:  # running out of memory (on any device) ends the measurement, not the finished run
        if not is_oom(e):
            raise
        return empty(
            label,
            f"baseline {label} ran out of memory during the measurement: {str(e).splitlines()[0]}",
        )
    finally:
        del other
        cache.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = paired.to_dict()
    out.update(
        baseline=label,
        budget_s=limit,
        skipped=None,
        strategy_step_s=out.pop("a_step_s"),
        baseline_step_s=out.pop("b_step_s"),
    )
    if compiled:
        out["baseline_note"] = (
            f"this run is compiled (compile.backend={run.session.backend}); the baseline runs "
            "eagerly"
        )
    if paired.rounds < MIN_ROUNDS_FOR_CI:
        out["note"] = (
            f"{paired.rounds} rounds ({paired.stopped}): an interval needs {MIN_ROUNDS_FOR_CI}"
        )
    return out


def contention(cfg: RunSpec) -> Optional[str]:
    """Why this run's step times share the machine with other timed work, or None."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    on_cpu = cfg.trainer.device == Device.cpu or (
        cfg.trainer.device == Device.auto and not torch.cuda.is_available()
    )
    if local > 1 and on_cpu:
        return f"{local} torchrun ranks share this machine's CPU cores"
    launcher = _hydra_launcher()
    if launcher is None:
        return None
    target = str(launcher.get("_target_", ""))
    if "joblib" in target.lower():
        n = launcher.get("n_jobs", -1)
        if n != 1:
            return (
                f"joblib launcher (n_jobs={n}): a sweep's jobs run side by side and time each "
                "other's load"
            )
    if "SubmititLocal" in target or "submitit_local" in target.lower():
        n = launcher.get("array_parallelism", None)
        if n != 1:
            return (
                f"submitit local launcher (array_parallelism={n}): a sweep's jobs run side by side "
                f"on this "
                "machine"
            )
    return None


def _hydra_launcher() -> Optional[Any]:
    """The Hydra launcher's settings of the job this process runs, if Hydra started it."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().get("launcher")

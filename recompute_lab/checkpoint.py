"""Training-state checkpoints for interruption and resume: atomic, versioned, refused when they do not match.

A checkpoint holds everything the next step depends on: model and optimizer state (master weights included,
through the optimizer's own state_dict), the LR schedule, the RNG states (dropout masks), the step, and the
loss/time history so far. Data needs no state: batch ``(step, micro)`` is a pure function of the seed. Resuming
an interrupted run therefore continues with bit-identical losses.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from recompute_lab.config import ConfigError, to_container

CHECKPOINT_VERSION = 1
FILENAME = "checkpoint.pt"
# Config sections that must match for a resumed run to continue the same training trajectory.
MUST_MATCH = ("model", "precision", "strategy", "data", "optimizer")
TRAINER_MUST_MATCH = ("steps", "grad_accum", "seed")


def fingerprint(cfg: DictConfig) -> dict:
    c = to_container(cfg)
    out = {k: c[k] for k in MUST_MATCH}
    out["trainer"] = {k: c["trainer"][k] for k in TRAINER_MUST_MATCH}
    return out


def save(path: Path, *, cfg: DictConfig, step: int, model, optimizer, scheduler, history: list, step_s: list) -> None:
    """Write the state after ``step`` completed steps, atomically (temp file + rename)."""
    state = {
        "version": CHECKPOINT_VERSION, "fingerprint": fingerprint(cfg), "step": step,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "history": list(history), "step_s": list(step_s),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def locate(resume: Any, run_dir: Path) -> Optional[Path]:
    """Map trainer.resume (null | true | a checkpoint file or run folder) to a checkpoint path, or None."""
    if resume in (None, False, "", "false", "False"):
        return None
    if resume in (True, "true", "True"):
        path = Path(run_dir) / FILENAME
        hint = (f"trainer.resume=true looks for {path}; rerun with hydra.run.dir=<the interrupted run's folder> "
                f"or give trainer.resume=<path to {FILENAME}>")
    else:
        path = Path(str(resume)).expanduser()
        path = path / FILENAME if path.is_dir() else path
        hint = f"trainer.resume={resume!r}: give a {FILENAME} file or the run folder that holds one"
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path} ({hint})")
    return path


def load(path: Path, cfg: DictConfig) -> dict:
    """Read and check a checkpoint; raise ConfigError for a corrupt, foreign or mismatched file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"checkpoint {path} has version {found!r}; this recompute_lab reads version "
                          f"{CHECKPOINT_VERSION}")
    theirs, ours = state["fingerprint"], fingerprint(cfg)
    diffs = sorted(_diff("", theirs, ours))
    if diffs:
        raise ConfigError(f"checkpoint {path} was written by a different configuration; differing keys: "
                          + ", ".join(diffs))
    return state


def restore(state: dict, model, optimizer, scheduler) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _diff(prefix: str, a: Any, b: Any) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff(f"{prefix}.{k}" if prefix else k, a.get(k), b.get(k))
        return out
    return [] if a == b else [f"{prefix} ({a!r} -> {b!r})"]

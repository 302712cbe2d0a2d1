"""Where a run came from: the code's git commit and the command line's Hydra overrides (for
results.json and W&B).

A leaf module (standard library, Hydra and OmegaConf; recompute_lab.record.fileio for writes),
cheap enough to call once per run: two git subprocesses of a few
milliseconds, nothing when the package is not a git checkout (an installed wheel) or git is missing.

Layer: record, primitives (importable from every layer above config, predict and model).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_info() -> dict:
    """{"commit", "branch", "dirty"} of the checkout this package runs from; all None outside a git
    checkout.
    ``dirty`` is true when tracked files differ from the commit (untracked files do not count).
    Cached: a sweep's
    jobs in one process share the answer (the code cannot change under a running process)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "branch": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": None if status is None else bool(status),
    }


def hydra_overrides() -> dict:
    """The running Hydra job's command-line overrides and group choices ({"task": [...], "choices":
    {...}}); empty
    lists when no Hydra job is running (the compose API, tests calling the engine directly)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {"task": [], "choices": {}}
    hc = HydraConfig.get()
    choices = {
        k: v for k, v in hc.runtime.choices.items() if not k.startswith(("hydra/", "schema/"))
    }
    return {"task": list(hc.overrides.task), "choices": dict(choices)}


def save_hydra_files(folder: Path, task_cfg) -> list[Path]:
    """Write Hydra's provenance files (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``)
    once a run has passed its folder's checks; returns the files written.

    conf/config.yaml sets ``hydra.output_subdir: null`` so that Hydra does not write them before
    the task starts: a run refused by the folder's lock or status would otherwise overwrite the
    provenance of the run that owns the folder. Nothing is written outside a Hydra job, or when a
    command names its own ``hydra.output_subdir`` (Hydra has written that one itself). Each file is
    replaced atomically (a planted symlink is replaced, not written through).
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from recompute_lab.record.fileio import atomic_write_text

    if not HydraConfig.initialized() or not isinstance(task_cfg, DictConfig):
        return []
    hc = HydraConfig.get()
    if hc.output_subdir is not None:
        return []
    out = Path(folder) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "config.yaml": task_cfg,
        "hydra.yaml": OmegaConf.create({"hydra": hc}),
        "overrides.yaml": hc.overrides.task,
    }
    for name, cfg in files.items():
        atomic_write_text(out / name, OmegaConf.to_yaml(cfg))
    return [out / name for name in files]

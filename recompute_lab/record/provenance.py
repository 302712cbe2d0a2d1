"""Where a run came from: the code's git commit and the command line's Hydra overrides (for
results.json and W&B).

A leaf module (standard library and Hydra only), cheap enough to call once per run: two git
subprocesses of a few
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

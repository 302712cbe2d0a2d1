"""This process's rank under torchrun or a SLURM launcher, read from its environment, and the
command line made safe for Hydra under a launcher: what every entry point needs before Hydra
parses its arguments, without importing torch (recompute_lab.run.distributed re-exports it).

Layer: run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def prepare_argv(argv: list[str]) -> list[str]:
    """The CLI's argv made safe for Hydra under a launcher (returned; ``argv`` itself is not
    changed).

    - ``--local_rank=N`` / ``--local-rank N`` (torch.distributed.launch, hydra#2038) is removed and
    put in
      LOCAL_RANK, where torchrun puts it anyway: Hydra's parser would reject it.
    - On ranks other than 0, Hydra's run / sweep dirs go to a private temporary dir (removed at
    exit), without
      the .hydra subdir or a log file, so only rank 0 creates an output dir. Appended last, these
      win over the
      user's own hydra.run.dir / hydra.sweep.dir for those ranks only.
    """
    out, i = [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank", "--local-rank")):
            value = (
                arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "0")
            )
            os.environ.setdefault("LOCAL_RANK", value)
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    if env_rank() > 0:
        scratch = tempfile.mkdtemp(prefix=f"recompute_lab_rank{env_rank()}_")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        out += [
            f"hydra.run.dir={scratch}",
            f"hydra.sweep.dir={scratch}",
            "hydra.sweep.subdir=.",
            "hydra.output_subdir=null",
            "hydra/job_logging=stdout",
            "hydra/hydra_logging=none",
        ]
    return out

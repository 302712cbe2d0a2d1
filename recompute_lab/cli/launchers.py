"""Hydra's joblib launcher, made to survive a dead worker: ``hydra/launcher=joblib`` (conf/hydra/
launcher/joblib.yaml) runs hydra_plugins.recompute_lab_launchers.SafeJoblibLauncher, whose launch
is :func:`launch_surviving` (Hydra takes launcher classes from the hydra_plugins namespace only).

joblib's loky pool dies with any one worker (a segfault, the OOM killer, ``os._exit``): the
plugin then raised TerminatedWorkerError, so the sweep ended in a traceback with no tally, the
jobs running beside the dead one were killed with it (their records left ``running``) and the rest
never ran (issue 31, finding 5). Here the jobs' results are collected as they finish; when the
pool breaks, each job that had not finished is run again alone in a fresh pool, so a dead worker
costs only its own job, which the tally then counts as killed. The sweep always reaches its
``on_multirun_end`` callbacks (analysis, tally).

Layer: cli.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra_plugins.hydra_joblib_launcher import _core

log = logging.getLogger(__name__)


def _indexed(i: int, *args: Any) -> tuple[int, JobReturn]:
    """One job in a worker, returned with its place in the batch (results arrive unordered)."""
    return i, _core.execute_job(*args)


def launch_surviving(
    launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    """The joblib plugin's launch, except that a dead worker costs only its own job (see the
    module docstring); ``launcher`` is the plugin's JoblibLauncher (config, task, options)."""
    from joblib import Parallel, delayed

    setup_globals()
    assert launcher.config is not None and launcher.task_function is not None
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    joblib_cfg = dict(launcher.joblib)
    joblib_cfg["backend"] = "loky"
    _core.process_joblib_cfg(joblib_cfg)
    log.info("Joblib.Parallel(%s) is launching %d jobs", joblib_cfg, len(job_overrides))
    for idx, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
    state = Singleton.get_state()

    def task(i: int):
        return delayed(_indexed)(
            i,
            initial_job_idx + i,
            job_overrides[i],
            launcher.hydra_context,
            launcher.config,
            launcher.task_function,
            state,
        )

    done: dict[int, JobReturn] = {}
    try:
        pool = Parallel(**joblib_cfg, return_as="generator_unordered")
        for i, ret in pool(task(i) for i in range(len(job_overrides))):
            done[i] = ret
    except Exception as e:  # TerminatedWorkerError, BrokenProcessPool...: the pool is gone
        left = [i for i in range(len(job_overrides)) if i not in done]
        log.error(
            "recompute_lab: a joblib worker died (%s); the %d unfinished job(s) run again, "
            "each in a fresh worker of its own",
            _first_line(e),
            len(left),
        )
        alone = {**joblib_cfg, "n_jobs": 2}  # one task, still in a worker process
        for i in left:
            try:
                ((_, done[i]),) = Parallel(**alone)([task(i)])
            except Exception as again:
                log.error(
                    "recompute_lab: job #%d (%s) lost its worker again (%s); the tally "
                    "counts it",
                    initial_job_idx + i,
                    " ".join(filter_overrides(job_overrides[i])),
                    _first_line(again),
                )
                done[i] = JobReturn(
                    overrides=list(job_overrides[i]), status=JobStatus.COMPLETED
                )
    return [done[i] for i in range(len(job_overrides))]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__

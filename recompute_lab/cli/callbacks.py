"""Hydra callback: analyse a sweep as soon as its last job ends (``hydra.callbacks.analyze`` in
conf/config.yaml).

Switch it off per command with ``hydra.callbacks.analyze.enabled=false`` (or drop it:
``~hydra.callbacks.analyze``).
The sweep's jobs have already written their results.json when this runs, so an analysis failure is
logged as a
warning and never turns a finished sweep into a failed command.

Layer: cli.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from recompute_lab.record.folder import is_locked, read_status

log = logging.getLogger(__name__)


class AnalyzeOnMultirunEnd(Callback):
    def __init__(
        self, enabled: bool = True, out: Optional[str] = None, formats: Any = None
    ) -> None:
        from recompute_lab.analysis import figure_formats

        self.enabled = enabled
        self.out = out  # None: SWEEP_DIR/analysis
        # None: png and pdf (or $RECOMPUTE_LAB_FIGURE_FORMATS); checked now, before any job runs
        self.formats = figure_formats(formats) if enabled else None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if SWEEP_STOP.get("signal"):  # stopped by a signal: end now, the tally follows
            log.info(
                "recompute_lab: analysis skipped, the sweep was stopped by %s; run "
                "python -m recompute_lab.analyze %s",
                SWEEP_STOP["signal"],
                sweep_dir,
            )
            return
        try:
            from recompute_lab.cli.analyze import analyze

            res = analyze(sweep_dir, Path(self.out) if self.out else None, formats=self.formats)
            log.info(
                "recompute_lab: sweep analysed -> %s (quiz.md, summary.csv, figures)", res["out"]
            )
        except (
            Exception
        ) as e:  # the runs are done and recorded; analysis is a bonus, never a failure
            log.warning(
                "recompute_lab: analysis of %s failed (%s: %s); rerun with "
                "python -m recompute_lab.analyze %s",
                sweep_dir,
                type(e).__name__,
                e,
                sweep_dir,
            )
            return
        log_to_wandb(config, sweep_dir, res)


def log_to_wandb(config: DictConfig, sweep_dir: Path, res: dict) -> None:
    """The analysis as one W&B run of the sweep's group (job_type analysis), per the sweep's logger
    settings
    (none with logger=none or logger.mode=disabled). W&B never fails the sweep (RunLogger warns
    instead)."""
    from recompute_lab.record.provenance import git_info
    from recompute_lab.record.wandb_run import RunLogger, sweep_group

    logger = RunLogger(
        config,
        res["out"],
        sweep_group(sweep_dir),
        job_type="analysis",
        tags=["analysis"],
        config={"sweep_dir": str(sweep_dir), "runs": len(res["rows"]), "git": git_info()},
    )
    if logger.run is not None:
        logger.analysis(res["rows"], res["files"])
        log.info(
            "recompute_lab: sweep analysis logged to W&B (%s, group %s)",
            logger.mode,
            sweep_group(sweep_dir),
        )
    logger.finish()


# Set by recompute_lab.cli.train when a signal stops a sweep run in this process: {"signal": NAME,
# "skipped": jobs not run}; the tally says so and the analysis is skipped (the sweep was stopped).
SWEEP_STOP: dict = {}

# Set by SweepTally at the end of a multirun: the command's exit status (recompute_lab.cli.train.cli
# reads it).
SWEEP_EXIT: dict = {}


def tally(sweep_dir: Path) -> tuple[str, int]:
    """("9 jobs: 7 ok, 1 oom, 1 error", exit status) for the results.json files under
    ``sweep_dir``."""
    counts: dict[str, int] = {}
    folders = {p.parent for p in Path(sweep_dir).glob("*/results.json")}
    # a job whose process died before its first record (a joblib worker killed) left only the
    # folder Hydra made for it, named N_... (conf/config.yaml's hydra.sweep.subdir)
    folders |= (
        {p for p in Path(sweep_dir).iterdir() if p.is_dir() and re.match(r"\d+(_|$)", p.name)}
        if Path(sweep_dir).is_dir()
        else set()
    )
    for folder in sorted(folders):
        status = read_status(folder / "results.json") or "no record"
        if status == "running" and not is_locked(folder):
            status = "killed"  # a running record that no live process holds
        counts[status] = counts.get(status, 0) + 1
    total = sum(counts.values())
    parts = [f"{counts.pop('ok')} ok"] if "ok" in counts else []
    parts += [f"{n} {status}" for status, n in sorted(counts.items())]
    return f"{total} jobs: {', '.join(parts) or 'none recorded'}", int(bool(counts) or not total)


class SweepTally(Callback):
    """At the end of a multirun (after the analysis callback, which is listed first), print one line
    counting
    the jobs by status and make the command exit 1 unless every job ended ok."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        line, code = tally(Path(config.hydra.sweep.dir))
        if SWEEP_STOP.get("signal"):
            line += (
                f"; the sweep was stopped by {SWEEP_STOP['signal']}: "
                f"{SWEEP_STOP.get('skipped', 0)} job(s) not run"
            )
            code = 1
        print(f"recompute_lab: {line}", flush=True)
        SWEEP_EXIT["code"] = code

"""Hydra callback: analyse a sweep as soon as its last job ends (``hydra.callbacks.analyze`` in conf/config.yaml).

Switch it off per command with ``hydra.callbacks.analyze.enabled=false`` (or drop it: ``~hydra.callbacks.analyze``).
The sweep's jobs have already written their results.json when this runs, so an analysis failure is logged as a
warning and never turns a finished sweep into a failed command.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class AnalyzeOnMultirunEnd(Callback):
    def __init__(self, enabled: bool = True, out: Optional[str] = None) -> None:
        self.enabled = enabled
        self.out = out  # None: SWEEP_DIR/analysis

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            from recompute_lab.analyze import analyze

            res = analyze(sweep_dir, Path(self.out) if self.out else None)
            log.info("recompute_lab: sweep analysed -> %s (quiz.md, summary.csv, figures)", res["out"])
        except Exception as e:  # the runs are done and recorded; analysis is a bonus, never a failure
            log.warning("recompute_lab: analysis of %s failed (%s: %s); rerun with "
                        "python -m recompute_lab.analyze %s", sweep_dir, type(e).__name__, e, sweep_dir)

"""Log lines that tell the story of a run: phase timings, periodic step lines, warnings without
source lines.

Hydra's job logging (conf/hydra/job_logging/recompute_lab.yaml) sends every ``recompute_lab.*``
logger to the
console (stderr, INFO and up) and to ``<job name>.log`` in the run dir (DEBUG and up), so
``train.log`` holds the
phases with their timings, the step lines and the summary even when the console shows a progress bar
instead.
A leaf module: only the standard library.

Layer: record, primitives (importable from every layer above config, predict and model).
"""

from __future__ import annotations

import logging
import time
import warnings


class Laps:
    """Time consecutive phases: ``laps("memory probe", "1.2 MB saved")`` logs "memory probe: 3.1 s
    (1.2 MB saved)"
    with the time since the previous lap (or since creation) and returns it in seconds."""

    def __init__(self, logger: logging.Logger, level: int = logging.INFO):
        self.log, self.level = logger, level
        self.t = time.perf_counter()

    def reset(self) -> None:
        self.t = time.perf_counter()

    def __call__(self, what: str, detail: str = "") -> float:
        now = time.perf_counter()
        seconds, self.t = now - self.t, now
        self.log.log(
            self.level, "%s: %s%s", what, seconds_text(seconds), f" ({detail})" if detail else ""
        )
        return seconds


def seconds_text(s: float) -> str:
    """3.1 s, 0.04 s, 2 min 05 s."""
    if s >= 120:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{s:.2f} s" if s < 1 else f"{s:.1f} s"


class StepLines:
    """About ten log lines over a training loop ("step 10/100: loss 5.43, 0.012 s/step, 42,000
    tokens/s"), and the
    first and last steps. ``level`` is DEBUG when a progress bar already shows the steps on the
    console (the lines
    then reach the log file only) and INFO otherwise."""

    def __init__(
        self, logger: logging.Logger, total: int, level: int = logging.INFO, lines: int = 10
    ):
        self.log, self.total, self.level = logger, total, level
        self.every = max(1, total // lines)

    def __call__(self, step: int, loss: float, step_s: float, tokens_per_s: float) -> None:
        done = step + 1
        if done == 1 or done == self.total or done % self.every == 0:
            self.log.log(
                self.level,
                "step %d/%d: loss %.4f, %.3f s/step, %s tokens/s",
                done,
                self.total,
                loss,
                step_s,
                f"{tokens_per_s:,.0f}",
            )


def route_warnings(logger_name: str = "py.warnings") -> None:
    """Show ``warnings.warn`` messages as one log line ("UserWarning: ...") without the source line
    that the
    default display (and ``logging.captureWarnings``) prints under it. Idempotent; tests that record
    warnings
    (``pytest.warns``) replace the display themselves and are unaffected."""
    log = logging.getLogger(logger_name)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        log.warning("%s: %s", category.__name__, message)

    warnings.showwarning = show

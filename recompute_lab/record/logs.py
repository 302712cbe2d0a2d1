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


class HeldFileLogs(logging.Handler):
    """Keep the root logger's log files (Hydra's ``train.log``) untouched until a run has started.

    Hydra opens the job's log file before the task runs; a run refused by its folder's lock or
    status (another process runs there, a finished run, a refused resume) must not append to the
    log of the run that owns the folder. While held, the file handlers are detached and their
    records buffered here: ``run_started()`` writes them out and re-attaches the
    files; ``close()`` before that drops them (the refusal reached the console only).
    """

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.root = logging.getLogger()
        self.files = [h for h in self.root.handlers if isinstance(h, logging.FileHandler)]
        self.records: list[logging.LogRecord] = []
        self.held = bool(self.files)
        for h in self.files:
            self.root.removeHandler(h)
        if self.held:
            self.root.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def run_started(self) -> None:
        """The buffered lines go to the files, and later lines go there directly. (Not
        ``release``: logging.Handler's lock method has that name.)"""
        if not self.held:
            return
        for h in self.files:
            for record in self.records:
                if record.levelno >= h.level:
                    h.handle(record)
        self._reattach()

    def close(self) -> None:
        if self.held:  # never released: a refused run; what it logged stays off the files
            self._reattach()
        super().close()

    def _reattach(self) -> None:
        self.root.removeHandler(self)
        for h in self.files:
            self.root.addHandler(h)
        self.records.clear()
        self.held = False

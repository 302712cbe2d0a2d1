"""Sweep analysis: results.json files -> one table row per run, ten figures, and the seed
notebook's quiz.

aggregate  loads every results.json under a folder and pairs each run with its `none` baseline
tables     summary and trade-off tables (CSV, Markdown, LaTeX)
figures    the ten figures (matplotlib, Agg; PNG + PDF by default, ``figure_formats`` below)
quiz       quiz.md: the seed notebook's four questions answered with the sweep's own numbers
estimates  the same for a sweep of estimates (no training runs)
The Hydra callback that runs all of it when a multirun ends: recompute_lab/cli/callbacks.py.
Entry point: ``python -m recompute_lab.analyze SWEEP_DIR [--out DIR] [--formats png,pdf]``
(recompute_lab/cli/analyze.py).

Layer: analysis (no torch).
"""

from __future__ import annotations

import os

# The figure files write_all writes by default: PNG to look at, PDF (TrueType text) for a paper.
# Each PDF is drawn again with its own layout pass and font subsetting: a quick look can ask for
# PNG alone (analyze --formats png, the callback's formats, or this variable).
FORMATS = ("png", "pdf")
FORMATS_ENV = "RECOMPUTE_LAB_FIGURE_FORMATS"


def figure_formats(formats=None) -> tuple[str, ...]:
    """The figure formats asked for: ``formats`` (names, or one comma-separated string), else
    $RECOMPUTE_LAB_FIGURE_FORMATS, else FORMATS. A ValueError names the valid ones."""
    if formats is None:
        formats = os.environ.get(FORMATS_ENV) or FORMATS
    if isinstance(formats, str):
        formats = formats.split(",")
    asked = tuple(dict.fromkeys(str(f).strip().lower() for f in formats if str(f).strip()))
    if not asked or any(f not in FORMATS for f in asked):
        raise ValueError(
            f"figure formats {list(formats)!r}: choose one or more of {', '.join(FORMATS)}"
        )
    return asked

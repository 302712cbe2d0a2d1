"""``recompute-lab-analyze SWEEP_DIR [--out DIR]`` (or ``python -m recompute_lab.analyze``): tables,
figures and
quiz for a finished sweep.

Reads every results.json under SWEEP_DIR (a multirun folder, or any folder of run folders) and
writes into DIR
(default SWEEP_DIR/analysis): summary.csv (one row per run, failed runs included with their status),
summary.md and summary.tex, tradeoff.md/.csv/.tex (the strategy trade-off), the figures as PNG +
PDF, and quiz.md. A folder of estimates (``recompute-lab-estimate -m ...``: estimate.json, no
results.json) gets estimates.csv/.md/.tex instead, a table of predictions across the swept axes
(recompute_lab.analysis.estimates). A folder with neither is an error (exit 2) and nothing is
written.

Layer: cli.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional


def analyze(
    sweep_dir: Path, out: Optional[Path] = None, label: Optional[str] = None, formats=None
) -> dict:
    """Analyse ``sweep_dir`` into ``out``; returns {"rows", "files", "out"}. Raises AnalysisError
    (and ValueError for unknown figure ``formats``, before anything is written).

    ``label`` names the sweep in quiz.md (default: the path as given); ``formats`` the figure files
    (recompute_lab.analysis.figure_formats: PNG and PDF unless asked otherwise).
    """
    from recompute_lab.analysis import figure_formats

    formats = figure_formats(formats)
    from recompute_lab.analysis.aggregate import (
        load_rows,
        write_csv,
        write_markdown,
    )  # torch: not for --help

    from recompute_lab.analysis import estimates
    from recompute_lab.analysis.aggregate import AnalysisError

    sweep_dir = Path(sweep_dir)
    try:
        rows = load_rows(sweep_dir)  # raises before anything is written
    except AnalysisError:
        if not sweep_dir.is_dir() or not estimates.find_estimates(sweep_dir):
            raise
        axes, est = estimates.load_estimates(sweep_dir)
        out = Path(out) if out is not None else sweep_dir / "analysis"
        files = estimates.write_estimates(axes, est, out, label or str(sweep_dir))
        return {"rows": [], "estimates": est, "files": files, "out": out}
    out = Path(out) if out is not None else sweep_dir / "analysis"
    refuse_symlinks(out, default=out == sweep_dir / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    from recompute_lab.analysis import (
        figures,
        quiz,
        tables,
    )  # matplotlib only when there is something to plot

    files = [out / "summary.csv", out / "summary.md", out / "summary.tex"]
    write_csv(rows, files[0])
    write_markdown(rows, files[1])
    tables.write_summary_tex(rows, files[2])
    files += tables.write_tradeoff(rows, out)
    files += figures.write_all(rows, out, formats)
    files.append(out / "quiz.md")
    quiz.write_quiz(rows, files[-1], source=label or str(sweep_dir))
    return {"rows": rows, "files": files, "out": out}


def refuse_symlinks(out: Path, default: bool) -> None:
    """Raise AnalysisError when the analysis would write through a symlink it did not make: a
    symlink inside ``out`` (a planted summary.csv or figure), or ``out`` itself where it is the
    sweep's own ``analysis`` folder (a ``--out`` the user names may be a link of theirs)."""
    from recompute_lab.analysis.aggregate import AnalysisError
    from recompute_lab.record.fileio import describe_symlinks, planted_symlinks

    if default and out.is_symlink():
        raise AnalysisError(
            f"{out} is a symlink that recompute_lab did not make; the analysis never writes "
            "through one: remove it or give --out"
        )
    links = planted_symlinks(out)
    if links:
        raise AnalysisError(
            f"{out} holds symlinks that recompute_lab did not make ({describe_symlinks(links)}); "
            "the analysis never writes through one: remove them or give another --out"
        )


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="recompute-lab-analyze", description=__doc__.split("\n\n")[0].replace("``", "")
    )
    p.add_argument(
        "sweep_dir",
        type=Path,
        help="folder holding the runs' results.json (e.g. multirun/DATE/TIME)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="where to write (default: SWEEP_DIR/analysis)"
    )
    p.add_argument(
        "--formats",
        default=None,
        help="figure files, comma-separated: png, pdf (default: png,pdf, or "
        "$RECOMPUTE_LAB_FIGURE_FORMATS); png alone skips drawing each figure a second time",
    )
    args = p.parse_args(argv)
    from recompute_lab.analysis import FORMATS_ENV, figure_formats
    from recompute_lab.analysis.aggregate import AnalysisError

    try:
        formats = figure_formats(args.formats)
    except ValueError as e:
        p.error(f"{'--formats' if args.formats is not None else '$' + FORMATS_ENV}: {e}")
    try:
        res = analyze(args.sweep_dir, args.out, formats=formats)
    except AnalysisError as e:
        print(f"recompute_lab.cli.analyze: {e}", file=sys.stderr)
        return 2
    rows = res["rows"]
    if "estimates" in res:
        est = res["estimates"]
        print(
            f"analysed {len(est)} estimate(s) (no training runs) -> {res['out'] / 'estimates.md'}"
        )
        print((res["out"] / "estimates.md").read_text().split("\n\n", 2)[2].rstrip())
        return 0
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"analysed {len(rows)} runs ({len(bad)} not ok) -> {res['out']}")
    for r in bad:
        print(f"  {r['run']}: {r['status']} {r['error'] or ''}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

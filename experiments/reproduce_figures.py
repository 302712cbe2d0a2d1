"""Regenerate every committed figure, table and quiz from scratch: run each figure's sweep
(conf/experiment/fig*.yaml), then analyse them.

    python experiments/reproduce_figures.py --out experiments/figures

Runs on CPU (tiny model, few steps, fixed seeds: trainer.seed=0, data.seed=1234) in about 18 min
(1078 s for the committed figures, at a load average of 5 to 7 from other work) on 2 shared cores.
The timed sweeps (figures 3 and 4: the paired step-time overhead) run REPLICATES times, each
replicate a separate process, one replicate of every timed sweep after the other and each with its
strategies in a rotated order; the analysis reports each time ratio's between-replicate 95%
prediction interval (what a rerun gives) beside the within-run one (one process's noise), and the
figures and quiz use the between-replicate one.

The run folders go to --runs (default outputs/reproduce_runs, git-ignored). A --runs folder this
script made (it holds the marker file .reproduce_figures) is emptied first, so nothing stale is
mixed in; any other non-empty folder is refused, never deleted. Each finished run is printed as it
lands.

--out receives the figures (PNG + PDF; the PNGs are committed), summary.{csv,md,tex},
tradeoff.{csv,md,tex}, what_fits.tex (read from experiments/what_fits.py's what_fits.md) and
quiz.md, plus what keeps them honest: results.json.gz (every run's results.json, the analysis
input) and manifest.json (sha256 of that input and of every artifact, the matplotlib version).
tests/integration/test_figures_fresh.py re-analyses results.json.gz with the current code and
compares it with the committed files, and reruns one run per strategy to check the bytes and FLOPs
in results.json.gz are what the current code measures. Rerunning gives the same summary.csv except
the timing columns (aggregate.TIMING_COLUMNS).

    python experiments/reproduce_figures.py --from-bundle experiments/figures/results.json.gz

re-analyses the committed results without running anything (after a change to the analysis code
only).

A sweep asks only for strategies this checkout has (conf/strategy/NAME.yaml); a figure whose runs
cannot be made yet is skipped with a note, and the figure and quiz.md then say which runs are
missing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recompute_lab.analysis.figures import FIGURES  # noqa: E402
from recompute_lab.analysis.tables import write_what_fits_tex  # noqa: E402
from recompute_lab.cli.analyze import analyze  # noqa: E402

# Timed sweeps (the paired step-time overhead is a figure's axis: figures 3 and 4, the throughput
# figure) run REPLICATES times, each replicate a separate process (one `train -m` sweep) after the
# previous one, with the strategy order rotated: a replicate's ratio then carries everything that
# differs between processes and times of day, which the within-run interval (rounds of one process)
# does not. The analysis reports both intervals (aggregate.replicate_intervals).
REPLICATES = 3
# (experiment config, extra overrides, timed): one sweep per figure; figure 5 adds the 20 B/param
# case as one more run. Untimed sweeps run once (bytes and FLOPs do not vary between runs).
SWEEPS = [
    ("fig1_activation_vs_context", [], False),
    ("fig2_memory_breakdown", [], False),
    ("fig5_bytes_per_param", [], False),
    (
        "fig5_bytes_per_param",
        ["precision=bf16_master", "precision.fp32_grad_accum=true"],
        False,
    ),
    ("fig3_pareto", [], True),
    ("fig4_components", [], True),
]


def available_strategies() -> set[str]:
    return {p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml")}


def _sweeper_params(experiment: str) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text())
    return cfg["hydra"]["sweeper"]["params"]


def sweep_strategies(experiment: str) -> list[str]:
    """The `+strategy` list of an experiment's hydra.sweeper.params (read from its YAML, no Hydra
    needed)."""
    return [s.strip() for s in str(_sweeper_params(experiment)["+strategy"]).split(",")]


def schema_has(key: str) -> bool:
    """Whether strategy selective has option ``key`` (its `modules` is what figure 4 sweeps)."""
    from recompute_lab.strategies import STRATEGIES, option_names

    return "selective" in STRATEGIES and key in option_names("selective")


def _rotate(items: list[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def plan(replicates: int = REPLICATES) -> list[tuple[str, str, list[str], str]]:
    """(experiment, sweep folder name, overrides, note) for every sweep this checkout can run, in
    the order they run: the untimed sweeps, then replicate 0 of every timed sweep, replicate 1, ...
    (each replicate with its strategies in a rotated order, so no strategy always runs first)."""
    have = available_strategies()
    once, timed = [], []
    for i, (exp, extra, is_timed) in enumerate(SWEEPS):
        wanted = sweep_strategies(exp)
        present = [s for s in wanted if s in have]
        if exp == "fig4_components" and not (present and schema_has("modules")):
            once.append((exp, "", [], "skipped: needs strategy=selective with strategy.modules"))
            continue
        if not present:
            once.append((exp, "", [], f"skipped: none of {wanted} exists in conf/strategy"))
            continue
        note = (
            ""
            if present == wanted
            else "without "
            + ",".join(s for s in wanted if s not in have)
            + " (not in conf/strategy)"
        )
        if extra:
            over = list(extra) + ["+strategy=none"]
        elif present != wanted:
            over = ["+strategy=" + ",".join(present)]
        else:
            over = []
        if not is_timed:
            once.append((exp, f"{i}_{exp}", over, note))
            continue
        for r in range(replicates):
            rot = list(over)
            if exp == "fig4_components":  # +strategy first: modules are selective's option
                mods = str(_sweeper_params(exp)["strategy.modules"]).replace("],[", "]|[")
                rot = [o for o in rot if not o.startswith("+strategy=")]
                rot.append("+strategy=" + ",".join(present))
                rot.append("strategy.modules=" + ",".join(_rotate(mods.split("|"), r)))
            else:
                rot = [o for o in rot if not o.startswith("+strategy=")]
                rot.append("+strategy=" + ",".join(_rotate(present, r)))
            timed.append((r, i, (exp, f"{i}_{exp}_r{r}", rot, note)))
    return once + [t[2] for t in sorted(timed, key=lambda t: (t[0], t[1]))]


MARKER = ".reproduce_figures"
BUNDLE = "results.json.gz"
MANIFEST = "manifest.json"
# What the freshness test compares byte for byte with a re-analysis (the PNGs only with the same
# matplotlib).
TEXT_ARTIFACTS = (
    "summary.csv",
    "summary.md",
    "summary.tex",
    "tradeoff.csv",
    "tradeoff.md",
    "tradeoff.tex",
    "what_fits.tex",
    "quiz.md",
)
# every figure the analysis draws (PNG; the PDFs are regenerated, not committed)
COMMITTED_FIGURES = tuple(f"{name}.png" for name in FIGURES)
# what_fits.tex is read from experiments/what_fits.py's table (not recomputed here)
WHAT_FITS_MD = ROOT / "experiments" / "figures" / "what_fits.md"


def prepare_runs(runs: Path) -> None:
    """Empty ``runs`` if this script made it (marker file); refuse any other non-empty folder."""
    if runs.exists() and any(runs.iterdir()):
        if not (runs / MARKER).is_file():
            raise SystemExit(
                f"{runs} is not empty and was not made by this script (no {MARKER}): not deleting "
                "it; pass an empty or new --runs folder"
            )
        shutil.rmtree(runs)
    runs.mkdir(parents=True, exist_ok=True)
    (runs / MARKER).write_text(
        "made by experiments/reproduce_figures.py; emptied on its next run\n"
    )


def run_sweep(exp: str, folder: Path, overrides: list[str]) -> None:
    """Run one sweep, printing each run as its results.json appears (a sweep is otherwise
    silent)."""
    cmd = [
        sys.executable,
        "-m",
        "recompute_lab.train",
        "-m",
        f"+experiment={exp}",
        f"hydra.sweep.dir={folder}",
        "hydra.callbacks.analyze.enabled=false",
        *overrides,
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True
        )
        seen: set[Path] = set()
        while True:
            done = proc.poll() is not None
            for p in sorted(folder.rglob("results.json")) if folder.exists() else []:
                if p not in seen and _status(p) not in (None, "running"):
                    seen.add(p)
                    print(f"  {_status(p)}: {p.parent.name}", flush=True)
            if done:
                break
            time.sleep(1.0)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(
                f"sweep {exp} failed (exit "
                f"{proc.returncode}):\n{' '.join(cmd)}\n{err.read()[-3000:]}"
            )


def _status(path: Path):
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_bundle(runs: Path, path: Path) -> None:
    """Every run's results.json in one small deterministic file: {relative run folder: results}."""
    data = {
        str(p.parent.relative_to(runs)): json.loads(p.read_text())
        for p in sorted(runs.rglob("results.json"))
    }
    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw)


# Decompressed size a bundle may have: the committed one (48 runs) is 0.36 MB; a hostile one of
# 379 KB took 790 MB when read whole.
MAX_BUNDLE_BYTES = 64 * 2**20


class BundleError(ValueError):
    """A bundle this script will not unpack (too large, not a {run folder: record} map, a run name
    that leaves its folder)."""


def read_bundle(path: Path) -> dict:
    """The bundle's {run folder: record} map, read at most MAX_BUNDLE_BYTES decompressed."""
    try:
        with gzip.open(path, "rb") as gz:
            raw = gz.read(MAX_BUNDLE_BYTES + 1)  # never more than the limit in memory
    except (OSError, EOFError) as e:
        raise BundleError(f"{path} is not a readable gzip bundle ({e})") from None
    if len(raw) > MAX_BUNDLE_BYTES:
        raise BundleError(
            f"{path} decompresses to more than {MAX_BUNDLE_BYTES:,} bytes (the limit, "
            "MAX_BUNDLE_BYTES); refused"
        )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{path} does not hold JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise BundleError(f"{path} is not a {{run folder: results.json record}} map")
    return data


def run_folder(runs: Path, name: str) -> Path:
    """``runs/name``, refused unless ``name`` is a relative path of plain parts that stays inside
    ``runs`` without passing a symlink (a bundle's names are data, not paths to trust)."""
    parts = name.split("/")  # the raw parts: pathlib would drop "." and "" silently
    if Path(name).is_absolute() or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise BundleError(
            f"run name {name!r}: a run folder must be a relative path inside the target folder "
            "(parts separated by '/', none empty, '.' or '..'; not absolute)"
        )
    folder = runs
    for part in parts:
        folder = folder / part
        if folder.is_symlink():
            raise BundleError(f"run name {name!r}: {folder} is a symlink; refused")
    return folder


def unpack_bundle(path: Path, runs: Path) -> int:
    """Write a bundle back out as run folders (what ``analyze`` reads); every name is checked
    before anything is written. Returns the number of runs."""
    bundle = read_bundle(path)
    runs.mkdir(parents=True, exist_ok=True)
    folders = {run: run_folder(runs, run) for run in bundle}
    for run, res in bundle.items():
        folders[run].mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW | O_EXCL: never through a planted link, never over another run's record
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(folders[run] / "results.json", flags, 0o666)
        except FileExistsError:
            raise BundleError(
                f"run name {run!r}: {folders[run] / 'results.json'} already exists; refused"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(res))
    return len(bundle)


def write_manifest(out: Path, source: str) -> None:
    import matplotlib
    import torch

    names = [BUNDLE, *TEXT_ARTIFACTS, *COMMITTED_FIGURES]
    man = {
        "generated_by": "python experiments/reproduce_figures.py",
        "source": source,
        "matplotlib": matplotlib.__version__,
        "torch": torch.__version__,
        "sha256": {n: _sha(out / n) for n in names if (out / n).is_file()},
    }
    (out / MANIFEST).write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")


def analyse_into(runs: Path, out: Path, source: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    write_bundle(runs, out / BUNDLE)  # first: the runs are kept even if the analysis fails
    res = analyze(runs, out, label=source)
    write_what_fits_tex(WHAT_FITS_MD, out / "what_fits.tex")
    write_manifest(out, source)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "experiments" / "figures",
        help="figures, tables, quiz.md",
    )
    p.add_argument(
        "--runs",
        type=Path,
        default=ROOT / "outputs" / "reproduce_runs",
        help="run folders (emptied only if this script made it)",
    )
    p.add_argument(
        "--from-bundle",
        type=Path,
        default=None,
        help="re-analyse this results.json.gz (e.g. the committed one) instead of running the "
        "sweeps",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.from_bundle is not None:
        source = (
            json.loads((args.from_bundle.parent / MANIFEST).read_text())["source"]
            if (args.from_bundle.parent / MANIFEST).is_file()
            else str(args.from_bundle)
        )
        with tempfile.TemporaryDirectory() as tmp:
            try:
                n_runs = unpack_bundle(args.from_bundle, Path(tmp))
            except BundleError as e:
                print(f"reproduce_figures: {e}", file=sys.stderr)
                return 2
            res = analyse_into(Path(tmp), args.out, source)
        print(
            f"re-analysed {n_runs} runs from {args.from_bundle} -> {args.out} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        return 0
    runs = args.runs.resolve()
    prepare_runs(runs)
    for exp, name, overrides, note in plan():
        if not name:
            print(f"{exp}: {note}", flush=True)
            continue
        t = time.perf_counter()
        print(f"{exp} {' '.join(overrides)}: running".rstrip(), flush=True)
        run_sweep(exp, runs / name, overrides)
        print(
            f"{exp} {' '.join(overrides)}: {time.perf_counter() - t:.0f} s {note}".rstrip(),
            flush=True,
        )
    source = os.path.relpath(runs, ROOT) if runs.is_relative_to(ROOT) else str(runs)
    res = analyse_into(runs, args.out, source)
    bad = [r for r in res["rows"] if r["status"] != "ok"]
    print(f"analysed {len(res['rows'])} runs ({len(bad)} not ok) from {source} -> {args.out}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

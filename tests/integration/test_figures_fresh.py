"""The committed figures, tables and quiz (experiments/figures/) are what the current code makes.

experiments/reproduce_figures.py commits, beside its artifacts, the analysis input (results.json.gz:
every run's
results.json) and manifest.json (sha256 of that input and of each artifact). Two checks, either one
failing
means: rerun `python experiments/reproduce_figures.py --out experiments/figures` and commit what it
writes.

- analysis: the committed results, analysed by the current analysis code, give every committed
  table (summary, tradeoff: .csv, .md, .tex; what_fits.tex), quiz.md byte for byte, and every
  committed PNG (under the manifest's matplotlib version); every figure quiz.md cites is committed
  and guarded, and the .gitignore allow-list keeps exactly these files.
- time: every committed time ratio has its between-replicate interval (>= 3 replicate processes);
  a slow test reruns one strategy's fresh replicate and checks the committed interval covers it.
- measurement: one committed run per strategy and per precision, rerun now (one step, no timing),
gives the same
  statuses, bytes and FLOPs (measured and predicted) as its committed results.json.
docs/reproducing.md quotes numbers from quiz.md; those quotes are checked against it too.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import reproduce_figures as rf  # noqa: E402

FIGS = ROOT / "experiments" / "figures"
# Deterministic fields of results.json: a change here means the code measures or predicts
# differently.
DETERMINISTIC = (
    "status",
    "memory.activation_bytes.measured",
    "memory.activation_bytes.predicted",
    "memory.peak_bytes.measured",
    "memory.peak_bytes.predicted",
    "memory.model_state_bytes.measured",
    "memory.model_state_bytes.predicted",
    "flops.per_step",
    "flops.predicted_per_step",
    "flops.recompute_overhead",
    "model.params",
)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _get(d, path):
    for k in path.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIGS / rf.MANIFEST).read_text())


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory, manifest) -> Path:
    tmp = tmp_path_factory.mktemp("fresh")
    rf.unpack_bundle(FIGS / rf.BUNDLE, tmp / "runs")
    rf.analyse_into(tmp / "runs", tmp / "out", manifest["source"])
    return tmp / "out"


def test_manifest_hashes_the_committed_files(manifest):
    """The committed artifacts come from one reproduction: the one that wrote this manifest."""
    for name in (rf.BUNDLE, *rf.TEXT_ARTIFACTS, *rf.COMMITTED_FIGURES):
        assert manifest["sha256"].get(name) == _sha(FIGS / name), (
            f"experiments/figures/{name} is not the file the last reproduction wrote: rerun "
            f"reproduce_figures.py"
        )


@pytest.mark.parametrize("name", rf.TEXT_ARTIFACTS)
def test_committed_tables_and_quiz_are_what_the_analysis_gives_now(regenerated, name):
    assert (regenerated / name).read_text() == (FIGS / name).read_text(), (
        f"experiments/figures/{name} is stale: the current analysis of results.json.gz differs; "
        f"rerun "
        "python experiments/reproduce_figures.py --from-bundle experiments/figures/results.json.gz"
    )


@pytest.mark.parametrize("name", rf.COMMITTED_FIGURES)
def test_committed_figures_are_what_the_analysis_draws_now(regenerated, manifest, name):
    import matplotlib

    if matplotlib.__version__ != manifest["matplotlib"]:
        pytest.skip(f"PNG bytes compared only under matplotlib {manifest['matplotlib']}")
    assert _sha(regenerated / name) == _sha(FIGS / name), f"experiments/figures/{name} is stale"


def _sample(bundle: dict) -> dict[str, dict]:
    """The first ok run of each strategy name and each precision: every code path the figures
    measure."""
    seen, out = set(), {}
    for run, res in sorted(bundle.items()):
        cfg = res["config"]
        keys = {
            ("strategy", cfg["strategy"]["name"]),
            ("precision", json.dumps(cfg["precision"], sort_keys=True)),
        }
        if res.get("status") == "ok" and not keys <= seen:
            seen |= keys
            out[run] = res
    return out


def test_committed_measurements_are_what_the_code_measures_now(tmp_path):
    from omegaconf import OmegaConf

    from recompute_lab.run import engine

    bundle = rf.read_bundle(FIGS / rf.BUNDLE)
    sample = _sample(bundle)
    assert len(sample) >= 8
    stale = []
    for i, (run, old) in enumerate(sample.items()):
        cfg = OmegaConf.create(old["config"])
        cfg.trainer.steps, cfg.trainer.overhead.enabled = (
            1,
            False,
        )  # bytes and FLOPs do not depend on either
        new = engine.run(cfg, tmp_path / str(i))
        stale += [
            f"{run}: {k} committed {_get(old, k)} now {_get(new, k)}"
            for k in DETERMINISTIC
            if _get(old, k) != _get(new, k)
        ]
    assert not stale, (
        "committed results.json.gz is stale (rerun experiments/reproduce_figures.py):\n"
        + "\n".join(stale)
    )


def test_readme_quotes_the_committed_quiz():
    """Every phrase the analysis section (docs/reproducing.md) takes from quiz.md (listed in its
    `<!-- from quiz.md:
    a | b -->`
    comments, shown in its text) is still in quiz.md."""
    from docs_text import page, section as under

    quiz = (FIGS / "quiz.md").read_text()
    section = under(page("reproducing"), "## Analysis and figures")
    quotes = [
        q.strip()
        for c in section.split("<!-- from quiz.md:")[1:]
        for q in c.split("-->")[0].split("|")
    ]
    assert quotes, "the analysis section quotes no quiz.md number"
    visible = section.split("<!--")[0] + "".join(
        c.split("-->", 1)[-1] for c in section.split("<!--")[1:]
    )
    for q in quotes:
        assert q in quiz, (
            f"docs/reproducing.md quotes {q!r}, which quiz.md no longer says: copy the new number"
        )
        assert q.replace("**", "") in visible.replace("**", ""), (
            f"docs/reproducing.md lists {q!r} but does not show it"
        )


def test_reproduce_never_deletes_a_folder_it_did_not_make(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="not deleting"):
        rf.prepare_runs(foreign)
    assert (foreign / "keep.txt").is_file()
    made = tmp_path / "made"
    rf.prepare_runs(made)
    (made / "old_run").mkdir()
    rf.prepare_runs(made)  # its own folder: emptied, marker kept
    assert not (made / "old_run").exists() and (made / rf.MARKER).is_file()


def test_every_reproduced_file_is_committed_and_guarded(manifest):
    """The allow-list keeps every file reproduce_figures writes (no figure is regenerated but left
    out) and the manifest hashes each of them."""
    allowed = {
        line[1:].strip()
        for line in (FIGS / ".gitignore").read_text().splitlines()
        if line.startswith("!")
    }
    for name in (rf.BUNDLE, rf.MANIFEST, *rf.TEXT_ARTIFACTS, *rf.COMMITTED_FIGURES):
        assert name in allowed, f"experiments/figures/.gitignore does not keep {name}"
        assert (FIGS / name).is_file(), f"experiments/figures/{name} is not committed"
    assert set(rf.TEXT_ARTIFACTS) | set(rf.COMMITTED_FIGURES) | {rf.BUNDLE} <= set(
        manifest["sha256"]
    )


def test_every_figure_the_quiz_cites_is_committed():
    import re

    quiz = (FIGS / "quiz.md").read_text()
    cited = set(re.findall(r"`(fig\d+_[a-z_]+\.png)`", quiz))
    assert cited, "quiz.md cites no figure"
    for name in sorted(cited):
        assert name in rf.COMMITTED_FIGURES and (FIGS / name).is_file(), (
            f"quiz.md cites {name}, which is not committed"
        )


@pytest.fixture(scope="module")
def committed_rows(tmp_path_factory):
    from recompute_lab.analysis.aggregate import load_rows

    tmp = tmp_path_factory.mktemp("rows")
    rf.unpack_bundle(FIGS / rf.BUNDLE, tmp)
    return load_rows(tmp)


def test_every_committed_time_ratio_has_its_replicate_interval(committed_rows):
    timed = [
        r
        for r in committed_rows
        if r["status"] == "ok" and r["time_overhead"] is not None and r["strategy"] != "none"
    ]
    assert timed, "the committed runs have no paired time overhead"
    for r in timed:
        assert (r["replicates"] or 0) >= rf.REPLICATES and r["time_overhead_rep_low"] is not None, (
            f"{r['run']}: a time ratio without its between-replicate interval "
            f"({r['replicates']} replicates)"
        )


@pytest.mark.slow
def test_replicate_interval_covers_a_fresh_rerun(committed_rows, tmp_path):
    """One more replicate of figure 3's `full` run, now, in its own process: its paired ratio lies
    inside the committed between-replicate 95% prediction interval (the within-run interval of a
    single process is not expected to cover it, and is not what the figures cite)."""

    from conftest import run_cli

    full = next(
        r
        for r in committed_rows
        if r["run"].startswith("4_fig3_pareto") and r["strategy"] == "full" and r["replicates"]
    )
    proc = run_cli(
        ["+experiment=fig3_pareto", "+strategy=full", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    ratio = res["time"]["overhead"]["ratio"] - 1
    lo, hi = full["time_overhead_rep_low"], full["time_overhead_rep_high"]
    assert lo <= ratio <= hi, (
        f"a fresh rerun of `full` gave {ratio:+.1%}, outside the committed between-replicate "
        f"interval [{lo:+.1%}, {hi:+.1%}]"
    )

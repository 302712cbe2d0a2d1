"""Planted symlinks are never written through (issue 31, finding 8): a run folder holding one is
refused before anything is written (train.log, .hydra/*.yaml, wandb/ and results.json stay where
they point, untouched); a figure that is a symlink is never staged for W&B; the analysis refuses
a planted output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import FAST, load_results, run_cli


def _victims(tmp_path: Path) -> tuple[Path, dict]:
    victim = tmp_path / "victim"
    (victim / "hyd").mkdir(parents=True)
    (victim / "wb").mkdir()
    (victim / "log").write_text("theirs\n")
    (victim / "x.png").write_bytes(b"png")
    return victim, {
        "train.log": victim / "log",
        ".hydra": victim / "hyd",
        "wandb": victim / "wb",
        "fig.png": victim / "x.png",
    }


def _tree(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("name", ["train.log", ".hydra", "wandb", "fig.png"])
def test_a_run_folder_with_a_planted_symlink_is_refused_and_nothing_is_written_through(
    tmp_path, name
):
    victim, links = _victims(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(links[name], run_dir / name)
    before = _tree(victim)
    proc = run_cli(
        [*FAST, "trainer.steps=1", "logger=wandb", f"hydra.run.dir={run_dir}"], cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "symlinks that recompute_lab did not make" in proc.stderr and name in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree(victim) == before
    assert (run_dir / name).is_symlink()  # left as it was, never replaced
    assert load_results(run_dir / "results.json")["status"] == "error"


def test_a_symlink_inside_hydra_is_refused(tmp_path):
    victim, _ = _victims(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    os.symlink(victim / "log", run_dir / ".hydra" / "config.yaml")
    proc = run_cli([*FAST, "trainer.steps=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2 and "config.yaml ->" in proc.stderr, proc.stderr
    assert (victim / "log").read_text() == "theirs\n"


def test_symlinked_figures_are_not_staged_for_wandb(tmp_path):
    from recompute_lab.record.wandb_run import RunLogger

    victim, _ = _victims(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "real.png").write_bytes(b"png")
    os.symlink(victim / "x.png", tmp_path / "planted.png")
    added = []

    class Art:
        def __init__(self, *a, **k):
            pass

        def add_file(self, path):
            added.append(Path(path).name)

    class Wandb:
        Artifact = Art

    logger = RunLogger.__new__(RunLogger)
    logger.run_dir, logger.run = tmp_path, type("R", (), {"id": "x", "log_artifact": print})()
    logger._artifacts(Wandb)
    assert added == ["results.json", "real.png"]


def test_analysis_refuses_a_planted_output(tmp_path):
    from recompute_lab.cli.analyze import main

    sweep = tmp_path / "sweep"
    (sweep / "analysis").mkdir(parents=True)
    (tmp_path / "theirs.csv").write_text("keep\n")
    os.symlink(tmp_path / "theirs.csv", sweep / "analysis" / "summary.csv")
    (sweep / "0").mkdir()
    (sweep / "0" / "results.json").write_text('{"status": "error", "error": "x"}')
    assert main([str(sweep)]) == 2
    assert (tmp_path / "theirs.csv").read_text() == "keep\n"


def test_a_long_model_name_keeps_its_wandb_run(tmp_path):
    """W&B's 64-character tag limit: a model name over ~57 characters made wandb.init fail and the
    run went on without W&B (issue 31, finding 14)."""
    from recompute_lab.config.spec import RunSpec
    from recompute_lab.record.wandb_run import MAX_TAG, RunLogger

    from conftest import compose_config

    cfg = compose_config(["logger=wandb", "logger.mode=offline", "model.name=" + "m" * 80])
    logger = RunLogger(RunSpec.of(cfg), tmp_path)
    try:
        assert logger.run is not None and logger.mode == "offline", logger.note
        assert all(len(t) <= MAX_TAG for t in logger.run.tags)
        assert any(t.startswith("model:mmm") and "~" in t for t in logger.run.tags)
    finally:
        logger.finish()

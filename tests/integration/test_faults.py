"""Faults at the edges of a run (issue 31): a final record the folder cannot take, a signal while
the first record and the W&B run start, refused runs that must leave a finished run's files
alone."""

from __future__ import annotations

import errno
import json
import signal
import sys

import pytest

from recompute_lab.record import folder as run_folder
from recompute_lab.record.folder import RecordNotSaved, fallback_path
from recompute_lab.run import engine

from conftest import FAST, compose_config, load_results

TINY = ["trainer.steps=2", "trainer.probe=false", *FAST]


def _disk_full(monkeypatch, also=lambda path: False):
    """The atomic writer fails with ENOSPC for every record but the ``running`` one (the folder
    fills up during the run), and for any other path ``also`` names."""
    real = run_folder.write_json_atomic

    def write(path, data):
        if (path.name == "results.json" and data.get("status") != "running") or also(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(run_folder, "write_json_atomic", write)


def test_final_record_goes_beside_the_folder_when_it_cannot_take_it(tmp_path, monkeypatch, capsys):
    _disk_full(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(RecordNotSaved, match="No space left on device"):
        engine.run(compose_config(TINY), run_dir)
    spare = load_results(fallback_path(run_dir))
    assert spare["status"] == "ok" and len(spare["loss"]["history"]) == 2
    assert "No space left" in spare["record_fallback"]
    err = capsys.readouterr().err
    assert str(fallback_path(run_dir)) in err and "status ok" in err
    assert not run_folder.is_locked(run_dir)  # the lock went with the run
    # the analysis and the sweep tally read the record beside the folder, not the running one
    from recompute_lab.analysis.aggregate import load_rows
    from recompute_lab.cli.callbacks import tally

    assert load_results(run_dir / "results.json")["status"] == "running"
    assert [r["status"] for r in load_rows(tmp_path)] == ["ok"]
    assert tally(tmp_path) == ("1 jobs: 1 ok", 0)


def test_final_record_goes_to_stderr_when_no_file_takes_it(tmp_path, monkeypatch, capsys):
    _disk_full(monkeypatch, also=lambda path: path.name.endswith(".results.json"))
    with pytest.raises(RecordNotSaved, match="stderr"):
        engine.run(compose_config(TINY), tmp_path / "run")
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == 1 and records[0]["status"] == "ok"
    assert records[0]["loss"]["final"] is not None


def _cli_exit_code(monkeypatch, run_dir) -> int:
    """The exit status of recompute-lab-train (in this process, so patches apply) in ``run_dir``."""
    from recompute_lab.cli import train

    argv = ["train", *TINY, f"hydra.run.dir={run_dir}", "hydra/job_logging=disabled"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        train.main()
    return stop.value.code


def test_cli_exits_non_zero_when_the_record_went_elsewhere(tmp_path, monkeypatch, capsys):
    _disk_full(monkeypatch)
    run_dir = tmp_path / "run"
    assert _cli_exit_code(monkeypatch, run_dir) == 1
    assert "could not be written" in capsys.readouterr().err
    assert load_results(fallback_path(run_dir))["status"] == "ok"


@pytest.mark.parametrize("fault", ["SIGTERM", "SIGINT", "error"])
def test_fault_while_wandb_starts_leaves_a_final_record(tmp_path, monkeypatch, fault):
    """The W&B start comes after the ``running`` record: a signal or a failure there must still end
    with a final record and the lock released (it used to leave ``running`` and a traceback)."""

    def start(*args, **kwargs):
        if fault == "error":
            raise RuntimeError("wandb-core died (injected)")
        signal.raise_signal(getattr(signal, fault))  # SignalFlag raises SetupInterrupted here
        raise AssertionError("the signal handler should have stopped the W&B start")

    monkeypatch.setattr(engine, "RunLogger", start)
    run_dir = tmp_path / "run"
    if fault == "error":
        with pytest.raises(RuntimeError, match="injected"):
            engine.run(compose_config(TINY), run_dir)
        want = "error"
    else:
        assert engine.run(compose_config(TINY), run_dir)["status"] == "interrupted"
        want = "interrupted"
    res = load_results(run_dir / "results.json")
    assert res["status"] == want and res["logger"]["mode"] == "disabled"
    assert not run_folder.is_locked(run_dir)


def _snapshot(run_dir) -> dict:
    """The files a refused run must leave as they were: the log, the provenance, the record."""
    names = ["train.log", "results.json", ".hydra/config.yaml", ".hydra/hydra.yaml"]
    names.append(".hydra/overrides.yaml")
    return {n: (run_dir / n).read_bytes() for n in names}


def test_refused_runs_leave_the_log_and_provenance_alone(tmp_path):
    """Busy folder, finished folder, refused resume: each is refused before Hydra's provenance or
    train.log of the folder's run changes (Hydra used to rewrite .hydra/*.yaml and append to
    train.log before the lock and status checks)."""
    import fcntl

    from conftest import run_cli
    from recompute_lab.record.folder import LOCK

    run_dir = tmp_path / "run"
    first = run_cli(["trainer.steps=1", *FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = _snapshot(run_dir)
    assert b"trainer.steps=1" in before[".hydra/overrides.yaml"] and before["train.log"]
    again = ["trainer.steps=3", *FAST, f"hydra.run.dir={run_dir}"]

    finished = run_cli(again, cwd=tmp_path)
    assert finished.returncode == 2 and "holds a finished run" in finished.stderr
    assert _snapshot(run_dir) == before

    with open(run_dir / LOCK, "a") as lock:  # another process runs there
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = run_cli(again, cwd=tmp_path)
    assert busy.returncode == 2 and "another process is running" in busy.stderr
    assert _snapshot(run_dir) == before

    # an interrupted run's folder, resumed with no checkpoint to resume from
    record = json.loads(before["results.json"])
    (run_dir / "results.json").write_text(json.dumps({**record, "status": "interrupted"}))
    before = _snapshot(run_dir)
    resume = run_cli([*again, "trainer.resume=true"], cwd=tmp_path)
    assert resume.returncode == 2 and "no checkpoint" in resume.stderr
    assert _snapshot(run_dir) == before


def test_estimate_refuses_a_model_too_deep_to_build_at_once(tmp_path):
    """recompute-lab-estimate model.n_layer=1000000000 used to build a billion meta blocks (a hang
    of weeks); train's guard now prices it from shapes and refuses before anything is built."""
    from conftest import run_cli

    out = tmp_path / "est"
    proc = run_cli(
        ["model.n_layer=1000000000", f"hydra.run.dir={out}"],
        cwd=tmp_path,
        module="recompute_lab.estimate",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "model.n_layer=1,000,000,000 is more blocks" in proc.stderr
    assert "GB of model state" in proc.stderr and "nothing was built" in proc.stderr
    # the estimate keeps Hydra's provenance (only the training run writes its own)
    assert (out / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.parametrize("memory_guard", ["true", "false"])
def test_train_refuses_a_model_too_deep_before_building_it(tmp_path, memory_guard):
    """n_layer=200000 at d_model=8 fits any memory, so the memory guard passes it on to its meta
    replica (a hang); with the guard off the real build would hang instead."""
    from conftest import run_cli

    run_dir = tmp_path / "run"
    args = ["model.n_layer=200000", "model.d_model=8", "model.n_head=1", *FAST]
    args.append(f"trainer.memory_guard={memory_guard}")
    proc = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "more blocks than" in proc.stderr, proc.stderr
    assert load_results(run_dir / "results.json")["status"] == "error"


def test_signal_before_the_start_is_recorded_and_ends_the_command_cleanly(
    tmp_path, monkeypatch, capsys
):
    """SIGTERM while the spec is checked (preflight): an interrupted record in the empty folder,
    exit 1 with one line, no traceback (it used to leave nothing and a traceback)."""
    real = engine.preflight

    def preflight(spec, run_dir):
        signal.raise_signal(signal.SIGTERM)
        return real(spec, run_dir)

    monkeypatch.setattr(engine, "preflight", preflight)
    run_dir = tmp_path / "run"
    assert _cli_exit_code(monkeypatch, run_dir) == 1
    res = load_results(run_dir / "results.json")
    assert res["status"] == "interrupted" and "SIGTERM" in res["error"]
    assert "Traceback" not in capsys.readouterr().err

"""Issue 15's attacks and faults, each as a test: records are never lost, bad input is refused
before it runs,
signals are honoured in every phase, out of memory on CPU is `oom`, sweeps say how their jobs
ended."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recompute_lab.run import engine
from recompute_lab.analysis.aggregate import load_rows, write_markdown
from recompute_lab.cli.overrides import check_overrides
from recompute_lab.config import ConfigError, bounded_name, validate
from recompute_lab.record.folder import LOCK, RunFolder, is_locked

from conftest import FAST, compose_config, load_results, run_cli

TINY = ["trainer.steps=3", "trainer.num_threads=1", "data.seq_len=16", "data.batch_size=2", *FAST]
# sweeps whose analysis a test does not read: the callback draws every figure (seconds)
NO_ANALYSIS = "hydra.callbacks.analyze.enabled=false"


# --- the run record is never lost -----------------------------------------------------------------


def test_a_finished_runs_record_survives_a_bad_resume_and_a_second_run(tmp_path):
    done = engine.run(compose_config(TINY), tmp_path)
    assert done["status"] == "ok"
    before = (tmp_path / "results.json").read_bytes()
    for overrides in (["trainer.resume=true"], ["optimizer.lr=0.1", "trainer.resume=true"], []):
        with pytest.raises(ConfigError):
            engine.run(compose_config([*TINY, *overrides]), tmp_path)
        assert (tmp_path / "results.json").read_bytes() == before  # untouched, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK, "results.json"])


def test_a_refused_resume_keeps_the_interrupted_record_and_a_new_attempt_keeps_it_beside(tmp_path):
    record = {
        "schema_version": 1,
        "status": "interrupted",
        "config": {},
        "note": "the earlier attempt",
    }
    (tmp_path / "results.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="no checkpoint"):
        engine.run(compose_config([*TINY, "trainer.resume=true"]), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == record
    res = engine.run(compose_config(TINY), tmp_path)  # a fresh attempt in the same folder
    assert res["status"] == "ok" and res["previous_record"].startswith("results.previous-1.json")
    assert json.loads((tmp_path / "results.previous-1.json").read_text()) == record


def test_an_invalid_config_in_an_empty_folder_still_leaves_an_error_record(tmp_path):
    with pytest.raises(ConfigError):
        engine.run(compose_config([*TINY, "model.n_head=7"]), tmp_path)
    assert load_results(tmp_path / "results.json")["status"] == "error"


def test_a_second_run_on_a_busy_folder_is_refused_and_writes_nothing(tmp_path):
    holder = RunFolder(tmp_path)
    holder.acquire()  # as a running job would
    try:
        assert is_locked(tmp_path)
        proc = run_cli([*TINY, f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
        assert proc.returncode == 2 and "another process is running in" in proc.stderr, proc.stderr[
            -2000:
        ]
        assert not (tmp_path / "results.json").exists()
    finally:
        holder.release()
    assert not is_locked(tmp_path)


def test_a_killed_job_leaves_a_running_record_that_analyze_reports(tmp_path):
    run_dir = tmp_path / "sweep" / "0_killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recompute_lab.train",
            "model=small",
            "data.seq_len=128",
            "data.batch_size=2",
            "trainer.steps=500",
            "trainer.num_threads=1",
            *FAST,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "results.json").exists():
        time.sleep(0.2)
    rec = load_results(run_dir / "results.json")
    assert rec["status"] == "running" and rec["pid"] == proc.pid
    assert is_locked(run_dir)
    proc.kill()
    proc.wait()
    assert not is_locked(run_dir)  # the kernel released the lock with the process
    rows = load_rows(tmp_path / "sweep")
    assert [(r["run"], r["status"]) for r in rows] == [("0_killed", "killed")]
    write_markdown(rows, tmp_path / "summary.md")
    assert "killed" in (tmp_path / "summary.md").read_text()


# --- bad input refused before it runs -------------------------------------------------------------


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optimizer.lr=nan", "optimizer.lr must be a finite number > 0, got nan"),
        ("optimizer.lr=inf", "optimizer.lr must be a finite number > 0, got inf"),
        ("optimizer.eps=-1", "optimizer.eps must be a finite number > 0"),
        ("optimizer.grad_clip=nan", "optimizer.grad_clip must be a finite number >= 0"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay must be a finite number >= 0"),
        ("trainer.max_memory_gb=nan", "trainer.max_memory_gb must be a finite number > 0"),
        ("model.rope_theta=-1", "model.rope_theta must be a finite number > 0"),
        ("model.norm_eps=-1", "model.norm_eps must be a finite number > 0"),
        ("optimizer.betas=[0.9,nan]", "optimizer.betas must be two numbers in [0, 1)"),
        ("model.dropout=nan", "model.dropout must be in [0, 1)"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused(override, needle):
    with pytest.raises(
        ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        validate(compose_config([override]))


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            ["+strategy=budget", "strategy.budget_fraction=nan"],
            r"budget_fraction must be in \(0, 1\]",
        ),
        (
            ["+strategy=budget", "strategy.device_memory_gb=inf"],
            "device_memory_gb must be a finite number > 0",
        ),
        (["+strategy=budget", "strategy.budget_bytes=-5"], "budget_bytes must be positive"),
    ],
)
def test_strategy_option_values_are_refused_before_the_probe_and_wandb(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        engine.run(compose_config([*TINY, *overrides, "logger=wandb"]), tmp_path)
    assert not (tmp_path / "wandb").exists()  # refused before W&B started
    assert load_results(tmp_path / "results.json")["status"] == "error"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["+stratgy=full"], "unknown config key 'stratgy' (did you mean 'strategy'?)"),
        (["+model.n_layr=8"], "model.n_layr is not a model option (did you mean 'n_layer'?)"),
        (
            ["+strategy=full", "+strategy.num_layers=2"],
            "strategy.num_layers is not an option of strategy 'full'",
        ),
    ],
)
def test_unknown_keys_added_with_plus_are_refused_with_a_suggestion(tmp_path, args, needle):
    with pytest.raises(
        ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
    ):
        check_overrides(args)
    proc = run_cli([*args, *FAST, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_an_absurd_model_is_refused_at_once_by_the_default_guard(tmp_path):
    t0 = time.perf_counter()
    res = engine.run(compose_config([*TINY, "model.n_layer=1000000000"]), tmp_path)
    assert (
        res["status"] == "oom" and "model state alone" in res["error"] and "exceeds" in res["error"]
    )
    assert time.perf_counter() - t0 < 10 and res["memory"]["guard"]["limit_bytes"] > 0


def test_a_loss_far_above_its_start_ends_the_run_as_diverged(tmp_path):
    res = engine.run(
        compose_config(
            [
                *TINY,
                "trainer.steps=30",
                "optimizer.lr=10",
                "optimizer.warmup_steps=0",
                "optimizer.grad_clip=0",
            ]
        ),
        tmp_path,
    )
    assert res["status"] == "diverged" and "trainer.diverge_factor" in res["error"]
    assert max(res["loss"]["history"]) > 10 * res["loss"]["history"][0]


# --- out of memory on CPU -------------------------------------------------------------------------


def test_cpu_out_of_memory_under_a_ulimit_is_recorded_as_oom(tmp_path):
    # 1.5 GB of address space: torch imports and the guard (told the machine has plenty) pass, the
    # step does not.
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, "
        "1_500_000_000)); "
        "from recompute_lab.cli.train import cli; sys.argv = ['train'] + sys.argv[1:]; cli()"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "model=small",
            "data.seq_len=1024",
            "data.batch_size=16",
            "trainer.steps=2",
            "trainer.max_memory_gb=1000",
            "trainer.num_threads=1",
            *FAST,
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rec = load_results(tmp_path / "results.json")
    assert rec["status"] == "oom", (rec.get("error"), proc.stderr[-2000:])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


# --- signals --------------------------------------------------------------------------------------


def test_sigterm_during_setup_ends_in_seconds_as_interrupted(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recompute_lab.train",
            "model=small",
            "data.seq_len=256",
            "+strategy=budget",
            "trainer.num_threads=1",
            *FAST,
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "results.json").exists():
        time.sleep(0.1)
    time.sleep(1.0)  # inside setup now (the budget planner prices its options for ~30 s)
    assert load_results(tmp_path / "results.json")["status"] == "running"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 5, "a signal during setup must stop the run within seconds"
    rec = load_results(tmp_path / "results.json")
    assert rec["status"] == "interrupted" and "during setup" in rec["error"], err[-2000:]
    assert proc.returncode == 1


@pytest.mark.slow  # 18 s; signals at every phase stay in the fast run (test_fault_matrix)
def test_ctrl_c_to_the_process_group_keeps_a_complete_wandb_record(tmp_path):
    from wandb_records import read_finished, summarize_records

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recompute_lab.train",
            "model=small",
            "data.seq_len=128",
            "data.batch_size=2",
            "trainer.steps=500",
            "trainer.num_threads=1",
            "trainer.progress=false",
            "logger=wandb",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    deadline = time.time() + 180
    while time.time() < deadline:  # wait for a few training steps
        time.sleep(1.0)
        rec = (
            load_results(tmp_path / "results.json") if (tmp_path / "results.json").exists() else {}
        )
        log = (tmp_path / "train.log").read_text() if (tmp_path / "train.log").exists() else ""
        # a step done (W&B history holds only per-step rows), which under load can take longer than
        # the sleep
        if (
            list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
            and rec.get("status") == "running"
            and "step 1/500" in log
        ):
            time.sleep(6.0)
            break
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert load_results(tmp_path / "results.json")["status"] == "interrupted", err[-2000:]
    run_file = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    records = read_finished(run_file)
    assert any(r.WhichOneof("record_type") == "exit" for r in records), (
        "the W&B record was cut short"
    )
    summary = summarize_records(records)
    assert summary["history"] and summary["summary"]
    assert "ConnectionResetError" not in err


# --- sweeps ---------------------------------------------------------------------------------------


def test_a_sweep_exits_nonzero_with_a_tally_when_a_job_fails(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "model.n_head=3,4", *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "recompute_lab: 2 jobs: 1 ok, 1 error" in proc.stdout
    assert (sweep / "analysis" / "summary.md").exists()  # the analysis ran before the exit status


def test_every_job_invalid_exits_nonzero(tmp_path):
    proc = run_cli(
        ["-m", "model.n_head=3,5", *TINY, NO_ANALYSIS, f"hydra.sweep.dir={tmp_path / 's'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "2 jobs: 2 error" in proc.stdout


def test_long_list_overrides_get_bounded_job_folder_names(tmp_path):
    names = ",".join(f"core_attn_{i:03d}" for i in range(40))
    assert len(bounded_name(names)) == 120 and bounded_name(names) != bounded_name(names + "x")
    assert bounded_name("short") == "short"
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            "+strategy=selective",
            f"strategy.modules=[{','.join(['mlp'] * 60)}]",
            *TINY,
            NO_ANALYSIS,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(job.name) <= 130 and load_results(job / "results.json")["status"] == "ok"


# --- analysis tolerates whatever the writer or a foreign tool produced ----------------------------


def test_analysis_reads_inf_nan_nulls_wrong_types_and_foreign_json(tmp_path):
    good = engine.run(compose_config(TINY), tmp_path / "a")
    weird = json.loads((tmp_path / "a" / "results.json").read_text())
    weird["loss"]["final"] = "inf"
    weird["time"]["step_s_median"] = "nan"
    weird["memory"]["activation_bytes"] = None
    weird["flops"] = "not a dict"
    weird["model"]["seq_len"] = [1, 2]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(weird))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps([1, 2, 3]))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.json").write_text(
        '{"schema_version": 1, "status": 5, "config": "x"}'
    )
    rows = {r["run"]: r for r in load_rows(tmp_path)}
    assert rows["a"]["status"] == "ok" and good["status"] == "ok"
    assert rows["b"]["final_loss"] == math.inf and rows["b"]["step_s_median"] is None
    assert rows["c"]["status"] == "unreadable"
    write_markdown(list(rows.values()), tmp_path / "summary.md")
    from recompute_lab.cli.analyze import analyze

    analyze(tmp_path, tmp_path / "out")
    assert (tmp_path / "out" / "summary.md").exists()


def test_results_and_checkpoints_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        engine.run(
            compose_config([*TINY, "trainer.checkpoint_every=1", "trainer.steps=2"]), tmp_path
        )
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
    assert Path(tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o644


def test_signal_flag_stops_setup_at_once_and_a_second_ctrl_c_names_the_last_checkpoint():
    from recompute_lab.run.failures import SetupInterrupted, SignalFlag

    flag = SignalFlag()
    with pytest.raises(SetupInterrupted, match="SIGTERM during setup"):
        flag._handle(signal.SIGTERM, None)
    flag.immediate, flag.received, flag.step = False, None, 41
    flag._handle(signal.SIGINT, None)  # first Ctrl-C in training: a flag, the step finishes
    assert flag.received == "SIGINT"
    with pytest.raises(KeyboardInterrupt, match="no checkpoint was written"):
        flag._handle(signal.SIGINT, None)
    flag.checkpointed_step = 40
    with pytest.raises(
        KeyboardInterrupt, match="during step 41; the last checkpoint holds step 40"
    ):
        flag._handle(signal.SIGINT, None)
    flag.closing = True  # while the final record is written nothing interrupts
    flag._handle(signal.SIGINT, None)

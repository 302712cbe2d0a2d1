"""End to end: the real CLI in a subprocess, the engine in-process, results.json per the
contract."""

from __future__ import annotations

import json
import re

import pytest

from recompute_lab.run.engine import run
from recompute_lab.record.results import write_json_atomic

from conftest import FAST, compose_config, load_results, run_cli

CONTRACT = {"schema_version", "status", "config", "env", "model", "loss", "memory", "flops", "time"}


def test_cli_default_full_run_writes_results(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        ["+strategy=full", "trainer.steps=12", *FAST, f"hydra.run.dir={out}"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    res = load_results(out / "results.json")
    assert CONTRACT <= set(res) and res["status"] == "ok" and res["schema_version"] == 1
    assert res["config"]["strategy"]["name"] == "full"
    assert len(res["loss"]["history"]) == 12 and res["loss"]["final"] < res["loss"]["first"]
    assert set(res["env"]) >= {
        "torch",
        "python",
        "device",
        "device_name",
        "dtype",
        "num_threads",
        "hostname",
    }
    assert res["model"]["params"] > 0 and res["model"]["seq_len"] == 64
    assert res["time"]["tokens_per_s"] > 0 and res["time"]["warmup_steps"] == 3
    # The loop's own time beside the steps: its parts add up to the iterations' wall time.
    lp = res["time"]["loop"]
    assert lp["iterations"] == 12 and lp["step_s"] == pytest.approx(sum(res["time"]["step_s"]))
    parts = lp["step_s"] + lp["data_s"] + lp["log_s"] + lp["other_s"] + lp["probe_s"]
    assert lp["data_s"] > 0 and lp["log_s"] > 0 and parts == pytest.approx(lp["wall_s"])
    assert 0 < lp["outside_step"] < 1
    ms = res["memory"]["model_state_bytes"]
    assert ms["measured"] == ms["predicted"] == 16 * res["model"]["params"]
    # train.log tells the story: every phase with its time, step lines, the end; the summary is in
    # it too.
    log = (out / "train.log").read_text()
    for phase in (
        "run: model tiny",
        "W&B run (disabled): ",
        "setup: ",
        "memory probe: ",
        "model + strategy full: ",
        "FLOP count on meta: ",
        "training: steps 1..12 of 12",
        "step 12/12: loss",
        "training: ",
        "step time median",
        "loop outside the step: ",
        "run ok: ",
        "status ok  model=tiny",
    ):
        assert phase in log, phase
    # the probe's measured step is training step 1 (recompute_lab.measure.probe
    # .shares_training_steps): its line follows that step's
    assert (
        log.index("FLOP count")
        < log.index("step 1/12")
        < log.index("memory probe")
        < log.index("run ok")
    )
    assert "[recompute_lab.run.engine][INFO] - memory probe: " in log and " s (activations " in log
    # full's peak is inside backward (an MLP's backward after its block's recompute), predicted
    # exactly; the summary prints "<=" only for the recompute phase's upper bound
    pk = res["memory"]["peak_bytes"]
    assert pk["predicted_parts"]["phase"] == "mlp_backward" and pk["predicted"] == pk["measured"]
    assert f"(predicted {pk['predicted'] / 1e6:.2f} MB, mem_tracker)" in log
    # The quick start page's example train.log has the phases and summary lines of this run (the
    # same
    # format, nothing renamed)
    from docs_text import page, section

    example = section(page("quickstart"), "## What a run tells you while it runs: train.log").split(
        "```"
    )[1]
    phases = {
        re.sub(r"\d+", "N", ln.split(" - ", 1)[1].split(":")[0])
        for ln in example.splitlines()
        if " - " in ln
    }
    ours = {
        re.sub(r"\d+", "N", ln.split(" - ", 1)[1].split(":")[0])
        for ln in log.splitlines()
        if " - " in ln
    }
    # FAST skips the paired overhead and W&B (the example logged offline)
    assert phases <= ours | {"paired overhead", "W&B run (offline)"}, phases - ours
    summary = [
        ln.strip().split(" ")[0] for ln in example.split("summary:")[1].splitlines() if ln.strip()
    ]
    assert all(
        any(ln.strip().startswith(w) for ln in log.splitlines()) for w in summary if w != "step"
    ), summary


def test_same_seed_same_loss_history(tmp_path):
    cfg = compose_config(["trainer.steps=6", "model.dropout=0.1", *FAST])
    a = run(cfg, tmp_path / "a")["loss"]["history"]
    b = run(cfg, tmp_path / "b")["loss"]["history"]
    assert a == b
    cfg.trainer.seed = 1
    assert run(cfg, tmp_path / "c")["loss"]["history"] != a


def test_text_data_and_grad_accum(tmp_path):
    cfg = compose_config(["data=text", "trainer.steps=4", "trainer.grad_accum=2", *FAST])
    res = run(cfg, tmp_path)
    assert res["status"] == "ok" and res["time"]["tokens_per_step"] == 2 * 8 * 64


def test_missing_text_file_is_a_clear_error(tmp_path):
    proc = run_cli(
        ["data=text", "data.path=/no/such/file.txt", *FAST, f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert load_results(tmp_path / "r" / "results.json")["status"] == "error"


@pytest.mark.parametrize(
    "args,needle,code",
    [
        (["+strategy=fulll"], "Could not find 'strategy/fulll'", 1),
        (["model.n_head=7"], "does not divide", 2),
        (
            ["model.n_layr=3"],
            "model.n_layr is not a model option (did you mean 'n_layer'?)",
            2,
        ),  # before Hydra
        (["strategy=full"], "+strategy=full", 1),
        (["trainer.device=cuda"], "CUDA is not available", 2),
    ],
)
def test_bad_input_exits_nonzero_with_message(tmp_path, args, needle, code):
    import torch

    if "trainer.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    proc = run_cli([*args, *FAST, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # 15 s; sweeps stay in the fast run (test_wandb, test_analysis, test_hardening)
def test_multirun_2x2_writes_four_results(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            "+strategy=none,full",
            "model.n_layer=1,2",
            "trainer.steps=3",
            *FAST,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(sweep.glob("*/results.json"))
    assert len(files) == 4
    names = sorted(f.parent.name for f in files)
    assert (
        "0_+strategy=none,model.n_layer=1,trainer.overhead.enabled=False,trainer.steps=3" in names
    )  # readable
    combos = {
        (load_results(f)["strategy"]["name"], load_results(f)["model"]["n_layer"]) for f in files
    }
    assert combos == {("none", 1), ("none", 2), ("full", 1), ("full", 2)}
    assert all(load_results(f)["status"] == "ok" for f in files)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(
            path, {"a": object()}
        )  # not serialisable: the old file must survive intact
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_wandb_offline_run_lands_in_run_dir(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        ["trainer.steps=3", "trainer.progress=false", f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env={"WANDB_API_KEY": "", "WANDB_MODE": ""},  # empty: unset, as a shell user means it
    )
    assert proc.returncode == 0, proc.stderr
    assert "W&B offline init failed" not in proc.stderr
    res = load_results(out / "results.json")
    assert res["logger"]["mode"] == "offline"
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_progress_bar_only_on_a_terminal(tmp_path):
    """trainer.progress=true with stderr redirected (a log file, SLURM, CI): no carriage-return
    bar updates in it; the step lines go to the console instead."""
    proc = run_cli(
        ["model=tiny", "trainer.steps=3", "logger=none", "trainer.progress=true",
         "trainer.overhead.enabled=false", f"hydra.run.dir={tmp_path}/run"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr
    assert re.search(r"step\s+3\s*/\s*3|step 3/3|\b3/3\b", proc.stderr), proc.stderr[-1500:]

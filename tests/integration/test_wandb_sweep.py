"""W&B Sweeps entry point: the sweep config it writes, and the command W&B's own agent builds from
it (the agent's
code run offline with its process launcher replaced), which must be a valid training command
line."""

from __future__ import annotations

import sys

import pytest
import yaml

from recompute_lab.cli import wandb_sweep
from recompute_lab.cli.overrides import compose_run_config
from recompute_lab.config import validate

from conftest import load_results, run_cli
from wandb_records import read_finished, summarize_records

SWEEP = [
    "model=tiny,small",
    "+strategy=none,full",
    "data.seq_len=range(32,65,32)",
    "trainer.steps=2",
    "trainer.probe=false",
]


def test_sweep_config_from_hydra_overrides():
    sweep = wandb_sweep.build_sweep(SWEEP)
    assert sweep["method"] == "grid"
    assert sweep["parameters"] == {
        "sweep.model": {"values": ["tiny", "small"]},
        "sweep.+strategy": {"values": ["none", "full"]},
        "sweep.data.seq_len": {"values": [32, 64]},
    }
    assert sweep["command"] == [
        "${env}",
        "${interpreter}",
        "-m",
        "recompute_lab.wandb_sweep",
        "run",
        "logger=wandb",
        "logger.mode=online",
        "trainer.steps=2",
        "trainer.probe=false",
        "${args_no_hyphens}",
    ]
    assert len(wandb_sweep.combinations(sweep)) == 8
    assert wandb_sweep.build_sweep(["+strategy=glob(s*)"])["parameters"] == {
        "sweep.+strategy": {"values": ["selective", "sqrt"]}
    }
    rnd = wandb_sweep.build_sweep(
        ["optimizer.lr=interval(0.001,0.01)", "model=tiny,small"], method="random"
    )
    assert rnd["parameters"]["sweep.optimizer.lr"] == {
        "distribution": "uniform",
        "min": 0.001,
        "max": 0.01,
    }
    with pytest.raises(ValueError, match="random or bayes"):
        wandb_sweep.build_sweep(["optimizer.lr=interval(0.001,0.01)"])
    with pytest.raises(ValueError, match="--metric"):
        wandb_sweep.build_sweep(["model=tiny,small"], method="bayes")
    with pytest.raises(ValueError, match="nothing to sweep"):
        wandb_sweep.build_sweep(["model=tiny"])


def agent_command(sweep: dict, args: dict, tmp_path, monkeypatch) -> dict:
    """What `wandb agent` would start for one run: W&B's Agent._command_run, with the process it
    launches
    recorded instead (sweep id, run id and the parameter file as the agent sets them)."""
    from wandb import wandb_agent

    started = {}

    class Recorded:
        def __init__(self, command=None, env=None, **kwargs):
            started.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorded)
    for key, value in {
        "WANDB_SWEEP_ID": "sweep123",
        "WANDB_DIR": str(tmp_path),
        "WANDB_RUN_ID": "",
        "WANDB_SWEEP_PARAM_PATH": "",
    }.items():
        monkeypatch.setenv(
            key, value
        )  # restored after the test (the agent sets some of them itself)
    agent = wandb_agent.Agent.__new__(wandb_agent.Agent)
    agent._sweep_command, agent._function, agent._in_jupyter = sweep["command"], None, False
    agent._forward_signals, agent._run_processes = False, {}
    agent._command_run(
        {
            "run_id": "run42",
            "program": sweep["program"],
            "args": {k: {"value": v} for k, v in args.items()},
        }
    )
    return started


def test_the_agents_command_is_a_valid_train_command_for_every_combination(tmp_path, monkeypatch):
    sweep = yaml.safe_load(
        yaml.safe_dump(wandb_sweep.build_sweep(SWEEP))
    )  # as `wandb sweep` reads the file
    for combo in wandb_sweep.combinations(sweep):
        command = agent_command(sweep, combo, tmp_path, monkeypatch)["command"]
        assert command[:6] == [
            "/usr/bin/env",
            "python",
            "-m",
            "recompute_lab.wandb_sweep",
            "run",
            "logger=wandb",
        ]
        overrides = wandb_sweep.train_overrides(command[5:])
        cfg = compose_run_config(overrides)  # the CLI's own checks, then Hydra
        validate(cfg)
        assert (cfg.model.name, cfg.strategy.name, cfg.data.seq_len) == (
            combo["sweep.model"],
            combo["sweep.+strategy"],
            combo["sweep.data.seq_len"],
        )
        assert cfg.logger.mode == "online" and cfg.trainer.steps == 2


def test_an_agent_run_trains_and_joins_the_sweep_offline(tmp_path, monkeypatch):
    """The agent's command, run: a training run whose W&B run is the sweep's (run id, sweep id),
    with the sweep's
    parameters beside (not instead of) the run's own config sections."""
    import subprocess

    sweep = wandb_sweep.build_sweep(
        ["model=tiny,small", "+strategy=none,full", "trainer.steps=2", "trainer.progress=false"]
    )
    started = agent_command(
        sweep, {"sweep.model": "tiny", "sweep.+strategy": "full"}, tmp_path, monkeypatch
    )
    command = [sys.executable if c == "python" else c for c in started["command"]]
    env = {
        **started["env"],
        "WANDB_API_KEY": "",
        "NETRC": str(tmp_path / "none"),
    }  # no server: offline fallback
    proc = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "outputs" / "wandb_sweep" / "sweep123" / "run42"
    res = load_results(run_dir / "results.json")
    assert res["status"] == "ok" and res["config"]["strategy"]["name"] == "full"
    assert "logging offline" in proc.stderr  # logger.mode=online without a key
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    rec = summarize_records(read_finished(files[0]))
    assert rec["run"].run_id == "run42" and rec["run"].sweep_id == "sweep123"
    assert rec["config"]["sweep.model"] == "tiny" and rec["config"]["sweep.+strategy"] == "full"
    assert rec["config"]["model"]["name"] == "tiny" and rec["config"]["strategy"]["name"] == "full"


def test_cli_writes_the_yaml_and_refuses_bad_values(tmp_path):
    proc = run_cli(
        ["model=tiny,small", "+strategy=none,full", "--out", "s.yaml"],
        cwd=tmp_path,
        module="recompute_lab.wandb_sweep",
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "4 runs" in proc.stdout
        and "wandb sweep s.yaml" in proc.stdout
        and "wandb agent" in proc.stdout
    )
    assert yaml.safe_load((tmp_path / "s.yaml").read_text())["parameters"]["sweep.model"] == {
        "values": ["tiny", "small"]
    }
    bad = run_cli(
        ["model=tiny,smal", "--out", "b.yaml"], cwd=tmp_path, module="recompute_lab.wandb_sweep"
    )
    assert bad.returncode == 2 and "model/smal" in bad.stderr and not (tmp_path / "b.yaml").exists()
    typo = run_cli(
        ["model.n_layr=1,2", "--out", "b.yaml"], cwd=tmp_path, module="recompute_lab.wandb_sweep"
    )
    assert typo.returncode == 2 and "did you mean 'n_layer'" in typo.stderr

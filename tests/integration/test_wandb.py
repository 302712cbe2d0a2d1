"""W&B mirror, read back from real offline run files; failure handling; the dashboard spec with the
API mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from recompute_lab.cli import dashboard

from recompute_lab.run import engine
from recompute_lab.model.gpt import GPT

from conftest import ROOT, compose_config, load_results, run_cli
from wandb_records import read_finished as read_records, summarize_records

OFFLINE = ["logger=wandb", "logger.mode=offline", "trainer.progress=false"]


def own_service_env() -> dict:
    """The environment for a CLI subprocess that must start its own wandb-core rather than join
    the service an earlier test of this process left (W&B passes it on in WANDB_SERVICE...)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_SERVICE", "WANDB__"))}


def run_file(run_dir):
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_offline_run_records_config_history_and_summaries(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    res = engine.run(compose_config(["trainer.steps=4", "+strategy=full", *OFFLINE]), tmp_path)
    assert res["status"] == "ok" and res["logger"]["mode"] == "offline"
    rec = summarize_records(read_records(run_file(tmp_path)))
    assert (
        rec["config"]["strategy"]["name"] == "full" and rec["config"]["model"]["name"] == "tiny"
    ), rec["config"]
    assert set(rec["run"].tags) >= {"model:tiny", "strategy:full", "precision:fp32"}
    steps = [h for h in rec["history"] if "loss" in h]
    assert len(steps) == 4
    assert {"loss", "lr", "step_s", "tokens_per_s", "grad_norm", "memory/rss_bytes"} <= set(
        steps[0]
    )
    assert [h["loss"] for h in steps] == pytest.approx(res["loss"]["history"])
    # History is the per-step series only: no one-point charts (the probe's figures are summary
    # values).
    assert len(rec["history"]) == 4 and all(set(h) == set(steps[0]) for h in rec["history"])
    assert all(h["grad_norm"] > 0 and h["memory/rss_bytes"] > 10**7 for h in steps)
    s = rec["summary"]
    assert s["loss"] == {
        "min": pytest.approx(min(res["loss"]["history"]))
    }  # define_metric summary=min
    assert s["flops/per_step/recompute"] == res["flops"]["per_step"]["recompute"] > 0
    assert s["memory/model_state_bytes/measured"] == res["memory"]["model_state_bytes"]["measured"]
    assert s["status"] == "ok" and "strategy=full" in s["summary_text"]
    assert s["grad_norm"] == {"max": pytest.approx(max(h["grad_norm"] for h in steps))}
    assert (
        s["activation_bytes_by_module"]["_type"] == "table-file"
        and s["run_summary"]["_type"] == "html-file"
    )
    assert any(r.WhichOneof("record_type") == "artifact" for r in read_records(run_file(tmp_path)))


def test_a_file_size_limit_is_said_in_the_record_and_a_cut_log_on_the_console(tmp_path):
    """Under ulimit -f W&B's .wandb file stops at the limit (wandb-core gets EFBIG) and the run
    itself is fine: the record says so from the start, and the end names the cut file once."""
    import resource

    limit = 24 * 1024  # results.json (~12 KB) fits, a 30-step run's .wandb (~36 KB) does not
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recompute_lab.train",
            "trainer.steps=30",
            "trainer.overhead.enabled=false",
            *OFFLINE,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        env=own_service_env(),  # its own wandb-core, under the limit
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = load_results(tmp_path / "run" / "results.json")
    assert res["status"] == "ok" and "file-size limit of 24,576 bytes" in res["logger"]["note"]
    assert run_file(tmp_path / "run").stat().st_size == limit
    assert proc.stderr.count("reached the file-size limit (24,576 bytes") == 1


def test_a_killed_wandb_core_costs_the_run_nothing_and_prints_no_traceback(tmp_path):
    """wandb-core (W&B's service process) killed mid-run: the run drops W&B with one line, ends
    ok, and W&B's exit hook does not print a traceback for the dead connection."""
    import signal
    import threading
    import time

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recompute_lab.train",
            "trainer.steps=100000",
            "trainer.overhead.enabled=false",
            "trainer.probe=false",
            *OFFLINE,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=own_service_env(),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()

    def until(text: str) -> None:
        deadline = time.time() + 120
        while not any(text in x for x in lines) and time.time() < deadline:
            time.sleep(0.2)

    try:
        core = None
        deadline = time.time() + 120
        while core is None and time.time() < deadline:  # this run's own service process
            found = subprocess.run(
                ["pgrep", "-f", f"wandb-core.*--pid {proc.pid}"], capture_output=True, text=True
            ).stdout.split()
            core = int(found[0]) if found else None
            time.sleep(0.2)
        assert core is not None, "no wandb-core started for the run"
        # Waits on what the run prints, not fixed sleeps (too short on a loaded machine): killed
        # before training starts, the core dies during W&B's init, which is another case.
        until("training: steps")
        os.kill(core, signal.SIGKILL)
        until("W&B log failed")  # its next log call failed
        proc.send_signal(signal.SIGTERM)  # end the run early; its record says interrupted
        proc.wait(timeout=120)
        reader.join(timeout=60)
        err = "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    res = load_results(tmp_path / "run" / "results.json")
    assert res["status"] == "interrupted" and "W&B log failed" in res["logger"]["note"], err[-2000:]
    assert "Traceback" not in err, err[-3000:]


def test_multirun_jobs_share_one_group_with_git_overrides_and_an_analysis_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["-m", "+strategy=none,full", "trainer.steps=2", *OFFLINE, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env={"WANDB_API_KEY": ""},
    )
    assert proc.returncode == 0, proc.stderr
    recs = [summarize_records(read_records(run_file(d))) for d in sorted(sweep.glob("*_*"))]
    runs = [r["run"] for r in recs]
    assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
    assert runs[0].run_group == runs[1].run_group == "_".join(sweep.parts[-2:])
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    for rec, strategy in zip(recs, ("none", "full")):
        assert rec["config"]["git"]["commit"] == head and isinstance(
            rec["config"]["git"]["dirty"], bool
        )
        assert {f"+strategy={strategy}", "trainer.steps=2", "logger.mode=offline"} <= set(
            rec["config"]["overrides"]
        )
        assert (
            rec["config"]["choices"]["strategy"] == strategy
            and rec["config"]["choices"]["model"] == "tiny"
        )
        assert rec["run"].job_type == "train"
    # The sweep's analysis is one more run of the group: summary.csv as a table, figures, quiz, an
    # artifact.
    analysis = read_records(run_file(sweep / "analysis"))
    rec = summarize_records(analysis)
    assert rec["run"].job_type == "analysis" and rec["run"].run_group == runs[0].run_group
    s = rec["summary"]
    assert "runs" in s, proc.stderr[-4000:]
    assert s["runs"] == 2 and s["runs_not_ok"] == 0 and s["summary_table"]["_type"] == "table-file"
    assert s["summary_table"]["nrows"] == 2 and s["quiz"]["_type"] == "html-file"
    assert s["figures/fig3_pareto"]["_type"] == "image-file" and not rec["history"]
    assert any(
        r.WhichOneof("record_type") == "artifact" and r.artifact.type == "sweep-analysis"
        for r in analysis
    )


def test_failing_job_finishes_its_run_and_the_next_job_starts_fresh(tmp_path, monkeypatch):
    real_forward = GPT.forward

    def boom(self, idx, targets=None):
        if idx.device.type != "meta":
            raise RuntimeError("injected failure")
        return real_forward(self, idx, targets)

    with monkeypatch.context() as m:
        m.setattr(GPT, "forward", boom)
        with pytest.raises(RuntimeError, match="injected"):
            engine.run(compose_config(["trainer.steps=2", *OFFLINE]), tmp_path / "a")
    assert load_results(tmp_path / "a" / "results.json")["status"] == "error"
    failed = read_records(run_file(tmp_path / "a"))
    exits = [r.exit.exit_code for r in failed if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]
    ok = engine.run(compose_config(["trainer.steps=2", *OFFLINE]), tmp_path / "b")
    assert ok["status"] == "ok"
    second = read_records(run_file(tmp_path / "b"))
    assert [r.exit.exit_code for r in second if r.WhichOneof("record_type") == "exit"] == [0]
    first_id = next(r.run.run_id for r in failed if r.WhichOneof("record_type") == "run")
    assert next(r.run.run_id for r in second if r.WhichOneof("record_type") == "run") != first_id


def test_wandb_init_failure_never_stops_training(tmp_path, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise ConnectionError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    # a failed init tears the service connection down (else, when wandb-core died during init,
    # W&B's exit hook printed a traceback at the end of a run that went on fine)
    teardowns = []
    monkeypatch.setattr(wandb, "teardown", lambda *a, **k: teardowns.append(1))
    with pytest.warns(UserWarning, match="W&B is down"):
        res = engine.run(
            compose_config(
                ["trainer.steps=2", "logger.mode=online", *OFFLINE[:1], "trainer.progress=false"]
            ),
            tmp_path,
        )
    assert res["status"] == "ok" and res["logger"]["mode"] == "disabled"
    assert "without W&B" in load_results(tmp_path / "results.json")["logger"]["note"]
    assert teardowns  # one per mode tried


@pytest.fixture
def mocked_workspace_api(monkeypatch):
    """wandb-workspaces with its online API replaced: views saved (upsert) and looked up
    (get_view_dict)."""
    import wandb
    import wandb_workspaces.workspaces.interface as iface
    import wandb_workspaces.workspaces.internal as internal

    api = {"views": {}, "sent": []}

    def upsert(view):
        api["sent"].append(view)
        view_id = view.id or f"id-{len(api['views']) + 1}"
        api["views"][view.name] = view_id
        return {"upsertView": {"view": {"name": view.name, "id": view_id}}}

    def lookup(entity, project, name):
        if name not in api["views"]:
            raise ValueError(f"Workspace `{name}` not found in project `{project}`")
        return {"id": api["views"][name], "displayName": "x", "spec": "{}"}

    monkeypatch.setattr(internal, "upsert_view2", upsert)
    monkeypatch.setattr(internal, "get_view_dict", lookup)
    fake_api = type("Api", (), {"settings": {"base_url": "https://api.wandb.ai"}, "client": None})
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: fake_api())
    monkeypatch.setattr(dashboard, "has_credentials", lambda: True)
    monkeypatch.setattr(
        iface.Workspace,
        "url",
        property(lambda self: f"https://wandb.ai/{self.entity}/{self.project}"),
    )
    return api


def runset_of(view) -> dict:
    return view.model_dump(by_alias=True)["spec"]["section"]["runSets"][0]


def test_dashboard_spec_with_api_mocked(mocked_workspace_api, capsys):
    assert (
        dashboard.main(["--entity", "me", "--project", "p", "--group", "2026-11-29_01-02-03"]) == 0
    )
    view = mocked_workspace_api["sent"][0]
    spec = view.model_dump(by_alias=True)
    assert spec["entity"] == "me" and spec["project"] == "p"
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    titles = [p["config"].get("chartTitle") for s in sections for p in s["panels"]]
    assert (
        "Peak memory (measured)" in titles
        and "Activation bytes vs recompute FLOP overhead" in titles
    )
    metrics = json.dumps(sections)
    for key in (
        "memory/activation_bytes/measured",
        "flops/recompute_overhead",
        "time/tokens_per_s",
        "loss",
        "grad_norm",
        "memory/rss_bytes",
    ):
        assert key in metrics
    runset = runset_of(view)
    # Grouped by strategy x precision x model (not averaged over models and precisions under one
    # strategy).
    assert [g["name"] for g in runset["grouping"]] == [
        "strategy.value.name",
        "precision.value.name",
        "model.value.name",
    ]
    filters = json.dumps(runset["filters"])
    assert "2026-11-29_01-02-03" in filters and '"jobType"' in filters and '"train"' in filters
    assert (
        "state" not in filters.lower() and "finished" not in filters
    )  # failed (oom, diverged) runs stay in
    assert "summary:status" in runset["runFeed"]["columnPinned"]
    assert "workspace saved" in capsys.readouterr().out


def test_dashboard_groups_by_the_swept_axes_and_updates_its_view_in_place(
    mocked_workspace_api, tmp_path, capsys
):
    sweep = tmp_path / "multirun" / "2026-11-29" / "01-02-03"
    for i, (strategy, seq) in enumerate([("none", 64), ("none", 128), ("full", 64), ("full", 128)]):
        job = sweep / f"{i}_job" / ".hydra"
        job.mkdir(parents=True)
        job.joinpath("overrides.yaml").write_text(
            f"- +strategy={strategy}\n- data.seq_len={seq}\n- model=small\n- logger.mode=offline\n"
        )
    assert dashboard.swept_axes(sweep) == [
        "strategy.name",
        "data.seq_len",
    ]  # model=small is not an axis
    args = [
        "--entity",
        "me",
        "--project",
        "p",
        "--group",
        "2026-11-29_01-02-03",
        "--sweep-dir",
        str(sweep),
    ]
    assert dashboard.main(args) == 0 and dashboard.main(args) == 0
    first, second = mocked_workspace_api["sent"]
    assert [g["name"] for g in runset_of(first)["grouping"]] == [
        "strategy.value.name",
        "data.value.seq_len",
    ]
    assert (
        first.name == second.name and not first.id and second.id == "id-1"
    )  # the second save updates the first
    out = capsys.readouterr().out
    assert (
        "workspace saved" in out
        and "workspace updated" in out
        and "grouped by strategy.name, data.seq_len" in out
    )
    assert (
        dashboard.main(
            ["--entity", "me", "--project", "p", "--groupby", "model.name,parallel.kind"]
        )
        == 0
    )
    assert [g["name"] for g in runset_of(mocked_workspace_api["sent"][2])["grouping"]] == [
        "model.value.name",
        "parallel.value.kind",
    ]


def test_axis_keys_of_overrides():
    assert [
        dashboard.axis_key(k)
        for k in (
            "+strategy",
            "model",
            "data",
            "parallel",
            "data.seq_len",
            "strategy.num_layers",
            "experiment",
            "hydra.launcher.partition",
            "logger.mode",
            "local",
        )
    ] == [
        "strategy.name",
        "model.name",
        "data.kind",
        "parallel.kind",
        "data.seq_len",
        "strategy.num_layers",
        None,
        None,
        None,
        None,
    ]


def test_dashboard_offline_explains_and_fails(tmp_path):
    proc = run_cli(
        ["--entity", "me", "--project", "p"],
        cwd=tmp_path,
        module="recompute_lab.dashboard",
        env={"WANDB_API_KEY": "", "NETRC": str(tmp_path / "none"), "HOME": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert "wandb sync" in proc.stderr and "WANDB_API_KEY" in proc.stderr


def test_dashboard_dry_run_prints_the_workspace_without_the_api(tmp_path, capsys, monkeypatch):
    """--dry-run needs neither a key nor the API: it prints the workspace, its grouping (the swept
    axes), filters and every panel's metrics; a hostile overrides.yaml is refused in one line."""
    pytest.importorskip("wandb_workspaces")
    monkeypatch.setattr(dashboard, "has_credentials", lambda: False)
    sweep = tmp_path / "sweep"
    for i, strategy in enumerate(("none", "full")):
        job = sweep / str(i) / ".hydra"
        job.mkdir(parents=True)
        job.joinpath("overrides.yaml").write_text(f"- +strategy={strategy}\n- model=tiny\n")
    args = ["--entity", "me", "--project", "p", "--sweep-dir", str(sweep), "--dry-run"]
    assert dashboard.main(args) == 0
    out = capsys.readouterr().out
    assert "runs grouped by strategy.name" in out and "nothing was sent to W&B" in out
    assert "memory/activation_bytes/measured" in out and "Metric(\"JobType\") == 'train'" in out
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("a: [\n")
    assert dashboard.main(args) == 2
    err = capsys.readouterr().err
    assert "not a Hydra overrides list" in err and "Traceback" not in err

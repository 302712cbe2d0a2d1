"""W&B mirror, read back from real offline run files; failure handling; the dashboard spec with the API mocked."""
from __future__ import annotations

import json

import pytest

from recompute_lab import dashboard, engine
from recompute_lab.model import GPT

from conftest import compose_config, load_results, run_cli
from wandb_records import read_finished as read_records, summarize_records

OFFLINE = ["logger=wandb", "logger.mode=offline", "trainer.progress=false"]


def run_file(run_dir):
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_offline_run_records_config_history_and_summaries(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    res = engine.run(compose_config(["trainer.steps=4", "+strategy=full", *OFFLINE]), tmp_path)
    assert res["status"] == "ok" and res["logger"]["mode"] == "offline"
    rec = summarize_records(read_records(run_file(tmp_path)))
    assert rec["config"]["strategy"]["name"] == "full" and rec["config"]["model"]["name"] == "tiny", rec["config"]
    assert set(rec["run"].tags) >= {"model:tiny", "strategy:full", "precision:fp32"}
    steps = [h for h in rec["history"] if "loss" in h]
    assert len(steps) == 4 and {"loss", "lr", "step_s", "tokens_per_s"} <= set(steps[0])
    assert [h["loss"] for h in steps] == pytest.approx(res["loss"]["history"])
    s = rec["summary"]
    assert s["loss"] == {"min": pytest.approx(min(res["loss"]["history"]))}  # define_metric summary=min
    assert s["flops/per_step/recompute"] == res["flops"]["per_step"]["recompute"] > 0
    assert s["memory/model_state_bytes/measured"] == res["memory"]["model_state_bytes"]["measured"]
    assert s["status"] == "ok" and "strategy=full" in s["summary_text"]
    assert any(r.WhichOneof("record_type") == "artifact" for r in read_records(run_file(tmp_path)))


def test_multirun_jobs_share_one_group(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "+strategy=none,full", "trainer.steps=2", *OFFLINE, f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path, env={"WANDB_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr
    runs = [summarize_records(read_records(run_file(d)))["run"] for d in sorted(sweep.glob("*_*"))]
    assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
    assert runs[0].run_group == runs[1].run_group == "_".join(sweep.parts[-2:])


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
    with pytest.warns(UserWarning, match="W&B is down"):
        res = engine.run(compose_config(["trainer.steps=2", "logger.mode=online", *OFFLINE[:1],
                                         "trainer.progress=false"]), tmp_path)
    assert res["status"] == "ok" and res["logger"]["mode"] == "disabled"
    assert "without W&B" in load_results(tmp_path / "results.json")["logger"]["note"]


def test_dashboard_spec_with_api_mocked(monkeypatch, capsys):
    import wandb
    import wandb_workspaces.workspaces.internal as internal

    sent = {}

    def upsert(view):
        sent["view"] = view
        return {"upsertView": {"view": {"name": "abc123", "id": "id-1"}}}

    monkeypatch.setattr(internal, "upsert_view2", upsert)
    fake_api = type("Api", (), {"settings": {"base_url": "https://api.wandb.ai"}, "client": None})
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: fake_api())
    monkeypatch.setattr(dashboard, "has_credentials", lambda: True)

    import wandb_workspaces.workspaces.interface as iface
    monkeypatch.setattr(iface.Workspace, "url", property(lambda self: f"https://wandb.ai/{self.entity}/{self.project}"))
    assert dashboard.main(["--entity", "me", "--project", "p", "--group", "2026-11-29_01-02-03"]) == 0
    spec = sent["view"].model_dump(by_alias=True)
    assert spec["entity"] == "me" and spec["project"] == "p"
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    titles = [p["config"].get("chartTitle") for s in sections for p in s["panels"]]
    assert "Peak memory (measured)" in titles and "Activation bytes vs recompute FLOP overhead" in titles
    metrics = json.dumps(sections)
    for key in ("memory/activation_bytes/measured", "flops/recompute_overhead", "time/tokens_per_s", "loss"):
        assert key in metrics
    runset = json.dumps(spec["spec"]["section"]["runSets"][0])
    assert "2026-11-29_01-02-03" in runset and "strategy" in runset and "precision" in runset
    assert "workspace saved" in capsys.readouterr().out


def test_dashboard_offline_explains_and_fails(tmp_path):
    proc = run_cli(["--entity", "me", "--project", "p"], cwd=tmp_path, module="recompute_lab.dashboard",
                   env={"WANDB_API_KEY": "", "NETRC": str(tmp_path / "none"), "HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert "wandb sync" in proc.stderr and "WANDB_API_KEY" in proc.stderr

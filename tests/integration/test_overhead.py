"""The in-run paired overhead (results.json time.overhead), timing hygiene (no timed step,
contention, the fixed
thread count) and the per-machine CPU peak cache."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from recompute_lab.measure import hardware

from recompute_lab.measure import overhead
from recompute_lab.config import ConfigError
from recompute_lab.run.engine import build, run
from recompute_lab.run.distributed import DistContext
from recompute_lab.config.spec import RunSpec

from conftest import FAST_TIMED, compose_config

TINY = ["trainer.steps=4", "trainer.warmup_steps=1", *FAST_TIMED]
KEYS = {"baseline", "ratio", "ci95_low", "ci95_high", "rounds", "method"}


def test_full_vs_none_is_measured_paired_with_an_interval(tmp_path):
    res = run(compose_config(["+strategy=full", *TINY]), tmp_path)
    o = res["time"]["overhead"]
    assert res["status"] == "ok" and KEYS <= set(o) and o["skipped"] is None
    assert o["baseline"] == "none" and 6 <= o["rounds"] <= 20 and len(o["ratios"]) == o["rounds"]
    assert o["ci95_low"] <= o["ratio"] <= o["ci95_high"] and "order-statistic" in o["method"]
    assert o["ratio"] == pytest.approx(sorted(o["ratios"])[len(o["ratios"]) // 2], rel=0.2)
    assert o["strategy_step_s"] > 0 and o["baseline_step_s"] > 0 and o["seconds"] > 0
    assert len(res["loss"]["history"]) == 4  # the measurement's steps are not training steps
    saved = json.loads((tmp_path / "results.json").read_text())["time"]["overhead"]
    assert saved["ratio"] == o["ratio"]


def test_the_baseline_run_itself_is_one_by_definition_and_the_switch_costs_nothing(tmp_path):
    o = run(compose_config(["+strategy=none", *TINY]), tmp_path / "a")["time"]["overhead"]
    assert (o["ratio"], o["ci95_low"], o["ci95_high"], o["rounds"]) == (1.0, 1.0, 1.0, 0)
    o = run(
        compose_config(["+strategy=full", "trainer.overhead.enabled=false", *TINY]), tmp_path / "b"
    )
    assert o["time"]["overhead"]["skipped"] == "trainer.overhead.enabled=false"
    assert o["time"]["overhead"]["ratio"] is None and KEYS <= set(o["time"]["overhead"])


def test_any_strategy_can_be_the_baseline(tmp_path):
    res = run(
        compose_config(
            [
                "+strategy=full",
                "trainer.overhead.baseline=selective",
                "trainer.overhead.max_rounds=6",
                *TINY,
            ]
        ),
        tmp_path,
    )
    o = res["time"]["overhead"]
    assert o["baseline"] == "selective" and o["rounds"] == 6 and o["ci95_low"] is not None


def test_a_baseline_that_would_not_fit_is_skipped_with_the_reason(tmp_path):
    # eager attention at s=128: predicted peak none 31.7 MB, full 12.6 MB; the guard allows 20 MB.
    shape = [
        "model.attention=eager",
        "model.n_layer=4",
        "model.max_seq_len=128",
        "data.seq_len=128",
    ]
    res = run(
        compose_config(["+strategy=full", "trainer.max_memory_gb=0.02", *shape, *TINY]), tmp_path
    )
    o = res["time"]["overhead"]
    assert res["status"] == "ok" and o["ratio"] is None and o["rounds"] == 0
    assert (
        o["skipped"].startswith("baseline none would not fit")
        and "trainer.max_memory_gb=0.02" in o["skipped"]
    )


def test_bad_overhead_settings_fail_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="valid strategies"):
        run(compose_config(["+strategy=full", "trainer.overhead.baseline=nonee", *TINY]), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["loss"]["history"] == []
    with pytest.raises(ConfigError, match="min_rounds"):
        run(
            compose_config(
                ["trainer.overhead.min_rounds=8", "trainer.overhead.max_rounds=4", *TINY]
            ),
            tmp_path,
        )


def test_the_measurement_is_proportionate_to_training():
    """Its wall time is capped at budget_fraction x the training loop's (never under min_seconds)
    besides max_seconds; 0 turns either cap off."""
    o = RunSpec.of(compose_config(["+strategy=full"])).trainer.overhead  # 0.5, 10 s, 120 s
    assert (o.budget_fraction, o.min_seconds, o.max_seconds) == (0.5, 10.0, 120.0)
    assert overhead.wall_budget(o, 30.0) == 15.0  # proportionate: half the training loop
    assert overhead.wall_budget(o, 2.0) == 10.0  # a short run still gets its rounds
    assert overhead.wall_budget(o, 500.0) == 120.0 and overhead.wall_budget(o, None) == 120.0
    assert overhead.wall_budget(o, 200.0) == 100.0
    off = RunSpec.of(
        compose_config(["trainer.overhead.budget_fraction=0", "trainer.overhead.max_seconds=0"])
    ).trainer.overhead
    assert overhead.wall_budget(off, 30.0) is None


def test_a_run_stops_measuring_at_its_budget_and_says_so(tmp_path):
    res = run(
        compose_config(
            [
                "+strategy=full",
                "trainer.overhead.budget_fraction=0.001",
                "trainer.overhead.min_seconds=0",
                "trainer.overhead.target_ci_width=0",
                *TINY,
            ]
        ),
        tmp_path,
    )
    o, loop = res["time"]["overhead"], res["time"]["loop"]
    assert o["budget_s"] == pytest.approx(0.001 * loop["wall_s"])
    assert o["stopped"] == "max_seconds" and o["rounds"] < 20
    with pytest.raises(ConfigError, match="budget_fraction"):
        run(compose_config(["trainer.overhead.budget_fraction=-1", *TINY]), tmp_path / "bad")


def test_arms_share_the_model_state_and_see_the_same_batches(tmp_path):
    cfg = compose_config(["+strategy=full", *TINY])
    r = build(RunSpec.of(cfg), {"memory": {}, "strategy": {}, "env": {}}, tmp_path, DistContext())
    base = overhead.build_baseline(
        RunSpec.of(cfg), r.policy, r.model, overhead.parse_options({"name": "none"})
    )
    pairs = list(
        zip(
            r.model.named_parameters(remove_duplicate=False),
            base.named_parameters(remove_duplicate=False),
        )
    )
    assert pairs and all(n1 == n2 and p1 is p2 for (n1, p1), (n2, p2) in pairs)
    assert all(b1 is b2 for (_, b1), (_, b2) in zip(r.model.named_buffers(), base.named_buffers()))
    seen: dict[tuple, str] = {}

    def fake_step(model, micro):  # records which arm ran on which batch
        key = tuple(micro[0][0].flatten()[:32].tolist())
        seen[key] = seen.get(key, "") + ("A" if model is r.model else "B")

    o = overhead.measure(RunSpec.of(cfg), r, fake_step)
    assert (
        o["rounds"] >= 6 and len(seen) == o["rounds"] + 1
    )  # one batch per round, one for the warmup round
    assert list(seen.values()) == ["AB"] + ["ABBA", "BAAB"] * (o["rounds"] // 2) + ["ABBA"] * (
        o["rounds"] % 2
    )


def test_no_timed_step_gives_null_time_with_a_reason(tmp_path):
    res = run(compose_config(["trainer.steps=3", "trainer.warmup_steps=3", *FAST_TIMED]), tmp_path)
    t = res["time"]
    assert res["status"] == "ok" and t["step_s_median"] is None and t["tokens_per_s"] is None
    assert "no step after trainer.warmup_steps=3 was timed" in t["reason"] and len(t["step_s"]) == 3
    assert res["flops"]["mfu"] is None


def test_thread_count_is_a_fixed_recorded_default(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        res = run(
            compose_config(["trainer.steps=2", "trainer.overhead.enabled=false", *FAST_TIMED]),
            tmp_path,
        )
        assert res["config"]["trainer"]["num_threads"] == 1 and res["env"]["num_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_parallel_launchers_and_cpu_ranks_mark_time_contended(monkeypatch):
    cfg = compose_config(["trainer.device=cpu"])
    assert overhead.contention(cfg) is None
    joblib = OmegaConf.create(
        {
            "_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
            "n_jobs": 2,
        }
    )
    monkeypatch.setattr(overhead, "_hydra_launcher", lambda: joblib)
    assert "joblib launcher (n_jobs=2)" in overhead.contention(cfg)
    joblib.n_jobs = 1
    assert overhead.contention(cfg) is None
    monkeypatch.setattr(
        overhead,
        "_hydra_launcher",
        lambda: OmegaConf.create(
            {
                "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
                "array_parallelism": 4,
            }
        ),
    )
    assert overhead.contention(cfg) is None  # only SubmititLocal / submitit_local targets are local
    monkeypatch.setattr(
        overhead,
        "_hydra_launcher",
        lambda: OmegaConf.create(
            {
                "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
                "SubmititLocalLauncher"
            }
        ),
    )
    assert "submitit local launcher" in overhead.contention(cfg)
    monkeypatch.setattr(overhead, "_hydra_launcher", lambda: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert overhead.contention(cfg) == "2 torchrun ranks share this machine's CPU cores"


def test_cpu_peak_stops_growing_the_gemm_once_one_is_slow(monkeypatch):
    """A dtype without a fast GEMM path (bf16 here: ~2.5 GFLOP/s) is measured at 256 and 512 only:
    a 512^3 GEMM takes 0.1 s, past CPU_PEAK_GROW_S, and a 1024^3 one would take 0.85 s x 11."""
    calls = []
    monkeypatch.setattr(hardware, "gemm_rate", lambda d, t, n, r: calls.append(n) or 2.5e9)
    assert hardware.cpu_gemm_peak("bfloat16") == 2.5e9 and calls == [256, 512]
    calls.clear()
    monkeypatch.setattr(hardware, "gemm_rate", lambda d, t, n, r: calls.append(n) or 9e10)
    assert hardware.cpu_gemm_peak("float32") == 9e10 and calls == [256, 512, 1024]


def test_cpu_peak_is_measured_once_per_machine_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(hardware, "_CPU_PEAKS", {})
    calls = []
    monkeypatch.setattr(hardware, "gemm_rate", lambda *a: calls.append(a) or 5e10)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        rate, source = hardware.peak_flops(torch.device("cpu"), torch.float32)
        sizes = len(hardware.CPU_PEAK_GEMMS)
        assert rate == 5e10 and len(calls) == sizes and "now, cached in" in source
        (path,) = tmp_path.glob("cpu_peak_float32_1t_*.json")
        record = json.loads(path.read_text())
        assert (
            record["key"] == hardware.cpu_peak_key("float32")
            and record["key"]["torch"] == torch.__version__
        )
        monkeypatch.setattr(
            hardware, "_CPU_PEAKS", {}
        )  # a new process: reads the file, measures nothing
        rate2, source2 = hardware.peak_flops(torch.device("cpu"), torch.float32)
        assert rate2 == 5e10 and len(calls) == sizes and f"cached {path}" in source2
        torch.set_num_threads(2)  # another thread count is another key
        hardware.peak_flops(torch.device("cpu"), torch.float32)
        assert len(calls) == 2 * sizes
        assert len(list(tmp_path.glob("cpu_peak_float32_2t_*.json"))) == 1
        torch.set_num_threads(1)
        monkeypatch.setattr(hardware, "_CPU_PEAKS", {})
        path.write_text("{broken")  # unreadable: measured again and rewritten
        hardware.peak_flops(torch.device("cpu"), torch.float32)
        assert len(calls) == 3 * sizes and json.loads(path.read_text())["flops"] == 5e10
        assert hardware.cpu_peak("float32", refresh=True)["cached"] is False
        assert len(calls) == 4 * sizes
    finally:
        torch.set_num_threads(before)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_full_vs_none_on_small_is_above_one_and_reruns_agree(tmp_path):
    """The real thing: `full` recomputes ~21% more FLOPs on `small` at s=256; its paired interval
    must lie
    strictly above 1, and two reruns must give overlapping intervals."""
    cfg = compose_config(
        [
            "model=small",
            "data.seq_len=256",
            "data.batch_size=2",
            "+strategy=full",
            "trainer.steps=2",
            "trainer.warmup_steps=1",
            "trainer.probe=false",
            *FAST_TIMED,
        ]
    )
    runs = [run(cfg, tmp_path / name)["time"]["overhead"] for name in ("a", "b")]
    for o in runs:
        print(
            f"full vs none, small s=256 b=2: ratio {o['ratio']} [{o['ci95_low']}, "
            f"{o['ci95_high']}], "
            f"{o['rounds']} rounds ({o['stopped']})"
        )
        assert o["skipped"] is None and o["rounds"] >= 6, o
        assert o["ci95_low"] > 1.0, o
    a, b = runs
    assert a["ci95_low"] <= b["ci95_high"] and b["ci95_low"] <= a["ci95_high"], (a, b)

"""Data parallelism: torchrun with DDP / FSDP2 on CPU (gloo) against one process, per-rank model
state, Hydra dirs.

The 2-rank runs use data.batch_size=2 per rank, the reference one process with batch_size=4: the
same global
batch, so the loss curves must agree to float rounding. Kept tiny (3 steps) because torchrun startup
dominates.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from recompute_lab.run import engine

from recompute_lab.predict import theory
from recompute_lab.config import ConfigError, validate
from recompute_lab.model.data import Batches
from recompute_lab.run.distributed import prepare_argv

from conftest import FAST, compose_config, load_results, run_cli

TINY = ["trainer.steps=3", "trainer.num_threads=1", "trainer.warmup_steps=0", "model.n_layer=2"]
PER_RANK_BATCH = 2


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m recompute_lab.train ARGS`` in ``cwd``. The
    launcher starts warm (run_cli); its ranks are fresh interpreters, one thread each (torchrun's
    own default for several ranks on a node when OMP_NUM_THREADS is unset)."""
    (cwd / "tmp").mkdir(exist_ok=True)
    return run_cli(
        ["--standalone", f"--nproc_per_node={nproc}", "-m", "recompute_lab.train", *args],
        cwd=cwd,
        module="torch.distributed.run",
        env={"TMPDIR": str(cwd / "tmp")},
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, the whole global batch (2 ranks x 2 rows)."""
    cfg = compose_config([*TINY, *FAST, f"data.batch_size={2 * PER_RANK_BATCH}"])
    return engine.run(cfg, tmp_path_factory.mktemp("single"))


# fsdp: Hydra's default dated dir. ddp: a user-given dir that would differ per rank if every rank
# honoured it.
@pytest.mark.parametrize("kind, run_dir", [("fsdp", None), ("ddp", "run_${oc.env:RANK,0}")])
def test_two_ranks_match_one_process(tmp_path, single, kind, run_dir):
    strategy = (
        ["+strategy=full"] if kind == "fsdp" else []
    )  # FSDP2 applied over checkpointed blocks
    extra = [f"hydra.run.dir={run_dir}"] if run_dir else []
    proc = torchrun(
        [
            f"parallel={kind}",
            *TINY,
            *strategy,
            f"data.batch_size={PER_RANK_BATCH}",
            "trainer.progress=false",
            *extra,
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Exactly one output dir (rank 0's) and one results.json; the other rank's scratch dir is gone.
    top = "run_0" if run_dir else "outputs"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([top, "tmp"])
    run_dirs = (
        [tmp_path / top] if run_dir else [p for p in (tmp_path / top).glob("*/*") if p.is_dir()]
    )
    assert len(run_dirs) == 1, run_dirs
    assert [p.parent for p in tmp_path.rglob("results.json")] == run_dirs
    assert not list(
        (tmp_path / "tmp").glob("recompute_lab_rank*")
    )  # torchelastic keeps its own folders there
    assert len(list(run_dirs[0].glob("wandb/offline-run-*"))) == 1  # rank 0's W&B run only
    # rank 1's log lives on in rank 0's folder (its own Hydra dir was a temporary one)
    rank1 = (run_dirs[0] / "rank1.log").read_text()
    assert "rank 1 logs to" in rank1 and "training: steps 1..3" in rank1
    res = load_results(run_dirs[0] / "results.json")
    assert res["status"] == "ok"

    # Same global batch, gradients averaged over ranks: the loss curve of one process.
    ref = single["loss"]["history"]
    for a, b in zip(res["loss"]["history"], ref, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)

    par = res["parallel"]
    assert (
        par["world_size"] == 2
        and par["backend"] == "gloo"
        and par["global_batch_size"] == 2 * PER_RANK_BATCH
    )
    one = single["memory"]["model_state_bytes"]["measured"]
    per_rank = [r["measured"] for r in par["per_rank"]]
    assert [r["rank"] for r in par["per_rank"]] == [0, 1]
    if kind == "fsdp":  # ZeRO-3: each rank holds half of params, grads and Adam state
        assert all(abs(m - one / 2) <= 0.05 * one / 2 for m in per_rank), (per_rank, one)
    else:  # DDP replicates the whole state
        assert per_rank == [one, one]
    if (
        kind == "fsdp"
    ):  # checkpointed blocks: the recompute phase bounds each rank's peak from above, FSDP's
        # gathered parameters and unsharded gradients included (recompute_lab.predict.peak)
        assert all(
            r["peak_bytes"] <= r["peak_bytes_predicted"] <= 1.5 * r["peak_bytes"]
            for r in par["per_rank"]
        )
        assert res["memory"]["peak_bytes"]["predicted_parts"]["phase"] == "recompute"
    # Predicted per-rank state (theory, no processes) matches what rank 0 measured.
    n = res["model"]["params"]
    predicted = theory.model_state_bytes_sharded(n, "fp32", parallel=kind, dp_size=2)
    ms = res["memory"]["model_state_bytes"]
    assert ms["predicted"] == predicted["total"]
    assert abs(ms["measured"] - predicted["total"]) <= 0.01 * predicted["total"]


def test_fsdp_single_rank_in_process_equals_plain_and_bf16_master_layout(tmp_path):
    """parallel=fsdp in one plain process (a 1-rank group): same losses; bf16_master keeps fp32
    shards."""
    plain = engine.run(compose_config([*TINY, *FAST]), tmp_path / "plain")
    sharded = engine.run(compose_config([*TINY, *FAST, "parallel=fsdp"]), tmp_path / "fsdp")
    assert sharded["loss"]["history"] == pytest.approx(plain["loss"]["history"], rel=1e-5)
    bf16 = engine.run(
        compose_config([*TINY, *FAST, "parallel=fsdp", "precision=bf16_master"]), tmp_path / "bf16"
    )
    ms = bf16["memory"]["model_state_bytes"]
    assert (
        bf16["status"] == "ok"
        and ms["dtypes"]["params"] == ["float32"]
        and ms["per_param"]["master"] == 0
    )
    assert ms["measured"] == ms["predicted"] == 16 * bf16["model"]["params"]
    assert any("master weights" in note for note in bf16["parallel"]["notes"])


def test_sharded_prediction():
    n = 1_000_000
    assert theory.model_state_bytes_sharded(n, "fp32", parallel="ddp", dp_size=8)["total"] == 16 * n
    z3 = theory.model_state_bytes_sharded(n, "bf16_master", parallel="fsdp", dp_size=64)
    assert z3["total"] == 16 * n // 64 and z3["per_param"]["master"] == 0
    # Playbook: 70B at 16 B/param = 1120 GB; ZeRO-3 over 64 ranks = 17.5 GB per rank.
    assert (
        theory.model_state_bytes_sharded(70 * 10**9, "fp32", parallel="fsdp", dp_size=64)["total"]
        == 17.5e9
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.dp_size=4"], "needs parallel=ddp"),
        (
            ["parallel=fsdp", "precision=bf16_master", "precision.fp32_grad_accum=true"],
            "fp32_grad_accum",
        ),
        (["parallel=ddp", "trainer.checkpoint_every=2"], "parallel=none only"),
        (["parallel=ddp", "parallel.dp_size=0"], "positive"),
    ],
)
def test_invalid_parallel_configs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


def test_dp_size_must_match_world_size(tmp_path):
    with pytest.raises(ConfigError, match="WORLD_SIZE=1"):
        engine.run(compose_config([*TINY, *FAST, "parallel=ddp", "parallel.dp_size=2"]), tmp_path)
    assert load_results(tmp_path / "results.json")["status"] == "error"


def test_parallel_none_under_a_launcher_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "WORLD_SIZE", "2"
    )  # as torchrun --nproc_per_node=2 would set; no collective is reached
    with pytest.raises(
        ConfigError, match="valid with several processes: parallel=ddp, parallel=fsdp"
    ):
        engine.run(compose_config([*TINY, *FAST]), tmp_path)


def test_interrupted_parallel_run_reports_no_checkpoint(tmp_path, monkeypatch):
    real_get = Batches.get

    def get(self, step, micro=0):
        if step == 1 and micro == 0:
            signal.raise_signal(
                signal.SIGTERM
            )  # the handler only sets a flag; reduce_step shares it
        return real_get(self, step, micro)

    monkeypatch.setattr(Batches, "get", get)
    res = engine.run(compose_config([*TINY, *FAST, "parallel=ddp"]), tmp_path)
    assert res["status"] == "interrupted" and "no checkpoint" in res["error"]
    assert len(res["loss"]["history"]) == 2 and not (tmp_path / "checkpoint.pt").exists()


def test_prepare_argv(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert prepare_argv(["train", "--local_rank=3", "parallel=ddp"]) == ["train", "parallel=ddp"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert prepare_argv(["train", "--local-rank", "1", "x=1"]) == ["train", "x=1"]
    monkeypatch.setenv("RANK", "1")
    argv = prepare_argv(["train", "parallel=ddp"])
    scratch = next(a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir="))
    assert "hydra.output_subdir=null" in argv and f"hydra.sweep.dir={scratch}" in argv
    assert Path(scratch).is_dir() and not Path(scratch).resolve().is_relative_to(
        Path.cwd().resolve()
    )


@pytest.mark.slow
def test_submitit_local_multirun(tmp_path):
    """The launcher family SLURM uses, with submitit's local executor: a 2-job sweep completes."""
    proc = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            *TINY,
            *FAST,
            "+strategy=none,full",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 2
    assert {load_results(p)["strategy"]["name"] for p in results} == {"none", "full"}
    assert all(load_results(p)["status"] == "ok" for p in results)


@pytest.mark.slow
def test_submitit_local_two_tasks_per_job_is_one_ddp_run(tmp_path, single):
    """tasks_per_node=2: each submitit task finds its rank in JobEnvironment; one results.json per
    sweep job."""
    proc = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=10",
            "parallel=ddp",
            *TINY,
            *FAST,
            f"data.batch_size={PER_RANK_BATCH}",
            "+strategy=full",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "sweep").glob("*/results.json")
    res = load_results(path)
    assert res["status"] == "ok" and res["parallel"]["world_size"] == 2
    assert res["loss"]["history"] == pytest.approx(single["loss"]["history"], rel=1e-4)


# fsdp in the fast run; ddp (its replicated state is the simpler case) with -m slow
@pytest.mark.parametrize("kind", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_per_rank_peak_is_measured_on_the_wrapped_model_and_predicted_by_the_estimator(
    tmp_path, kind
):
    """The probe runs its step under the same DDP / FSDP2 wrapping: each rank's peak is its own, and
    the estimator
    (no processes, parallel.dp_size=2) predicts it to the byte. Tiny at 8 x 64 tokens per rank peaks
    at backward
    start (recompute_lab.predict.peak)."""
    shape = ["model=tiny", "data.batch_size=8", "trainer.num_threads=1"]
    proc = torchrun(
        [
            f"parallel={kind}",
            *shape,
            "trainer.steps=1",
            "trainer.progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = load_results(tmp_path / "run" / "results.json")
    per_rank = res["parallel"]["per_rank"]
    out = tmp_path / "estimate.json"
    est = run_cli(
        [
            *shape,
            f"parallel={kind}",
            "parallel.dp_size=2",
            "estimate.target=cpu",
            f"estimate.out={out}",
        ],
        cwd=tmp_path,
        module="recompute_lab.estimate",
    )
    assert est.returncode == 0, est.stderr
    predicted = load_results(out)["memory"]["peak_bytes"]["predicted"]
    assert [r["peak_bytes"] for r in per_rank] == [predicted, predicted]
    assert [r["peak_bytes_predicted"] for r in per_rank] == [predicted, predicted]
    assert res["memory"]["peak_bytes"]["predicted_parts"]["phase"] == "backward_start"

    # Against one process with the same per-rank batch, each difference named (n: parameters, fp32 +
    # AdamW).
    one = engine.run(compose_config([*shape, *FAST, "trainer.steps=1"]), tmp_path / "one")[
        "memory"
    ]["peak_bytes"]
    n = res["model"]["params"]
    if kind == "ddp":  # gradient_as_bucket_view: the 4 B/param buckets live through backward
        assert per_rank[0]["peak_bytes"] - one["measured"] == 4 * n
    # half of params (4 B) and Adam (8 B); root unsharded; the last block's all-gather prefetched
    else:
        cfg = compose_config(shape).model
        root = 4 * (cfg.vocab_size + cfg.max_seq_len + 2) * cfg.d_model
        block = 4 * (n - (cfg.vocab_size + cfg.max_seq_len + 2) * cfg.d_model) // cfg.n_layer
        assert per_rank[0]["peak_bytes"] - one["measured"] == -(4 + 8) * n // 2 + root + block

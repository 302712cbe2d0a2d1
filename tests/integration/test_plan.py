"""The advisor through its real CLI: the planning question in one command, a ranked table whose
memory column is the per-GPU estimate's (the same function, and the estimate command prints the
same peak for the exported layout), and exports that torchtitan's and Megatron-LM's option names
accept."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
from conftest import compose_config, run_cli
from omegaconf import OmegaConf

from recompute_lab.config import LayoutConfig
from recompute_lab.config.spec import RunSpec
from recompute_lab.predict import per_gpu

# torchtitan 0.3's ParallelismConfig / TrainingConfig fields the export writes
# (torchtitan/config/configs.py) and Megatron-LM's arguments (megatron/training/arguments.py):
# the names as those files define them. With torchtitan installed (pip install
# '.[interop]'), test_torchtitan_builds_its_configs_from_the_export builds its own classes.
TORCHTITAN = {
    "parallelism": {
        "data_parallel_replicate_degree", "data_parallel_shard_degree", "tensor_parallel_degree",
        "enable_sequence_parallel", "context_parallel_degree", "pipeline_parallel_degree",
        "pipeline_parallel_schedule", "pipeline_parallel_microbatch_size",
    },
    "training": {"local_batch_size", "global_batch_size", "seq_len"},
}
MEGATRON = {
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
    "--sequence-parallel", "--micro-batch-size", "--global-batch-size", "--seq-length",
    "--use-torch-fsdp2", "--use-distributed-optimizer", "--recompute-granularity",
    "--recompute-method", "--recompute-num-layers",
}


def test_the_planning_question_in_one_command(tmp_path):
    proc = run_cli(
        ["model=llama3_8b", "data.seq_len=8192", "plan.gpus=8", "plan.gpu=h100_80gb",
         f"hydra.run.dir={tmp_path}/run"],
        tmp_path,
        module="recompute_lab.plan",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranked by predicted tokens/s" in proc.stdout and "torchtitan TOML" in proc.stdout
    res = json.loads((tmp_path / "run" / "plan.json").read_text())
    rows = res["rows"]
    keys = [(not r["fits"], -r["tokens_per_s"]) for r in rows]
    assert keys == sorted(keys) and rows[0]["fits"]
    assert res["global_batch"] == 8 and res["precision"] == "bf16_master"
    # every row's memory is the per-GPU estimate's busiest rank, for its layout and strategy
    model = RunSpec.of(compose_config(["model=llama3_8b", "data.seq_len=8192"])).model
    for r in rows[:5]:
        if r["strategy"] not in per_gpu.STRATEGIES:
            continue
        lay = OmegaConf.structured(LayoutConfig(**r["layout"]))
        got = per_gpu.stage_bytes(model, lay, r["strategy"], r["micro_batch"], 8192)
        assert max(x["total"] for x in got) == r["peak_bytes"]
    # the exports parse, with the option names the tools define
    ex = res["exports"]
    toml = tomllib.loads(ex["torchtitan_toml"])
    for section, fields in toml.items():
        assert set(fields) <= TORCHTITAN[section], section
    assert toml["parallelism"]["tensor_parallel_degree"] == rows[0]["layout"]["tp"]
    flags = set(re.findall(r"--[a-z0-9-]+", ex["megatron_args"]))
    assert flags <= MEGATRON
    # the estimate command it exports prints the same peak for the winner
    cmd = ex["recompute_lab"].split()[3:]
    assert cmd[0].startswith("model=")
    if rows[0]["strategy"] in per_gpu.STRATEGIES:
        est = run_cli([*cmd, f"estimate.out={tmp_path}/est.json", f"hydra.run.dir={tmp_path}/e"],
                      tmp_path, module="recompute_lab.estimate")
        assert est.returncode == 0, est.stderr[-3000:]
        lay = json.loads((tmp_path / "est.json").read_text())["series"][0]["per_gpu"]
        assert max(x["total"] for x in lay["stages"]) == rows[0]["peak_bytes"]


def test_bad_plan_inputs_are_refused_with_the_valid_choices(tmp_path):
    proc = run_cli(["model=llama3_8b", "plan.gpu=h900", f"hydra.run.dir={tmp_path}/r"], tmp_path,
                   module="recompute_lab.plan")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "h100_80gb" in proc.stdout + proc.stderr
    proc = run_cli(["model=llama3_8b", "plan.strategies=[op]", f"hydra.run.dir={tmp_path}/s"],
                   tmp_path, module="recompute_lab.plan")
    assert proc.returncode == 2 and "none, selective, full" in proc.stdout + proc.stderr


def test_torchtitan_builds_its_configs_from_the_export():
    """torchtitan's own ParallelismConfig and TrainingConfig accept every exported row's fragment
    (test-only extra: pip install '.[interop]')."""
    configs = pytest.importorskip("torchtitan.config.configs")
    from recompute_lab.predict import advisor

    model = RunSpec.of(compose_config(["model=llama3_8b", "data.seq_len=8192"])).model
    res = advisor.advise(model, 8192, 16, "h100_80gb", 32, max_pp=4)
    for row in [r for r in res["rows"] if r["fits"]][:10]:
        ex = advisor.export(row, "llama3_8b", 8192, 32, "bf16_master", "h100_80gb")
        toml = tomllib.loads(ex["torchtitan_toml"])
        par = configs.ParallelismConfig(**toml["parallelism"])
        assert par.tensor_parallel_degree == row["layout"]["tp"]
        configs.TrainingConfig(**toml["training"])

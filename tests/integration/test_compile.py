"""torch.compile as an axis (recompute_lab.measure.compiled): compiled runs measure what they save
and recompute.

Shapes are tiny (2 layers, batch 2, seq 32) and compiled results are shared through module-scoped
fixtures: one
compile per budget of the eager-kernel backend (aot_eager_decomp_partition, ~2 s each here). Every
compile starts
from torch._dynamo.reset() (recompute_lab.measure.compiled.Session does it), so no test sees
another's graphs.
"""

from __future__ import annotations

import torch
import pytest

from conftest import FAST, compose_config, load_results, run_cli, one_thread_fixture
from recompute_lab.config.spec import RunSpec

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)

SHAPE = ["model=tiny", "data.seq_len=32", "data.batch_size=2"]
BUDGETS = (1.0, 0.5, 0.1)


def _session(budget, scope="model", strategy="none"):
    from omegaconf import OmegaConf

    from recompute_lab.measure import compiled
    from recompute_lab.model.gpt import build_model
    from recompute_lab.strategies import apply_strategy

    cfg = compose_config(
        [
            *SHAPE,
            "compile=eager_partition",
            f"compile.scope={scope}",
            f"+strategy={strategy}",
            *([] if budget is None else [f"compile.memory_budget={budget}"]),
        ]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu", torch.float32).train()
    apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape())
    session = compiled.Session(cfg.compile)
    session.apply(model)
    return cfg, OmegaConf.to_container(cfg.compile), session, model


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)


def _eager_none():
    from recompute_lab.measure.memory import saved_tensors
    from recompute_lab.model.gpt import build_model

    cfg = compose_config(SHAPE)
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu", torch.float32).train()
    idx, tgt = _batch()
    counted = saved_tensors(model, lambda: model(idx, tgt))
    counted["output"].backward()
    return {
        "saved": counted["total"],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


@pytest.fixture(scope="module")
def eager_none():
    return _eager_none()


@pytest.fixture(scope="module")
def compiled_grid():
    """Per partitioner budget (whole model compiled, strategy none): hooked saved bytes, graph
    counts, gradients."""
    from recompute_lab.measure import compiled

    out = {}
    idx, tgt = _batch()
    for budget in BUDGETS:
        cfg, _, session, model = _session(budget)
        session.first_step(lambda m=model: m(idx, tgt).backward(), "test")  # compiles
        model.zero_grad(set_to_none=True)
        session.recorder.reset()
        counted = compiled.count_saved(model, lambda m=model: m(idx, tgt))
        graph_saved = sum(p.calls * p.saved_bytes() for p in session.recorder.pairs)
        graphs = compiled.graph_measurements(session.recorder)
        counted["output"].backward()
        out[budget] = {
            "hooked": counted["total"],
            "graph_saved": graph_saved,
            "graphs": graphs,
            "calls": session.recorder.calls,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        }
    torch._dynamo.reset()
    return out


@pytest.mark.parametrize("budget", BUDGETS)
def test_hooked_saved_bytes_equal_the_backward_graphs_saved_inputs(compiled_grid, budget):
    got = compiled_grid[budget]
    assert got["calls"] == 1  # the compiled graph ran (no eager fallback under the hook)
    assert got["hooked"] == got["graph_saved"] > 0


def test_partitioner_budget_lowers_saved_bytes_monotonically(compiled_grid, eager_none):
    saved = [compiled_grid[b]["hooked"] for b in BUDGETS]
    assert saved[0] > saved[1] > saved[2]
    assert (
        saved[0] <= eager_none["saved"]
    )  # budget 1.0: the min-cut already recomputes some cheap ops
    assert saved[2] < 0.25 * eager_none["saved"]


@pytest.mark.parametrize("budget", BUDGETS)
def test_compiled_gradients_match_eager_none(compiled_grid, eager_none, budget):
    for name, ref in eager_none["grads"].items():
        got = compiled_grid[budget]["grads"][name]
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), name


def test_graph_flops_hold_the_whole_forward_and_recompute_grows_as_the_budget_shrinks(
    compiled_grid,
):
    from recompute_lab.measure import flops

    cfg = compose_config([*SHAPE, "trainer.grad_accum=1"])
    forward = flops.count_step_flops(RunSpec.of(cfg))["forward"]  # meta replica, eager
    rec = [compiled_grid[b]["graphs"]["recompute"] for b in BUDGETS]
    assert all(compiled_grid[b]["graphs"]["forward"] == forward for b in BUDGETS)
    assert rec[0] <= rec[1] <= rec[2] and rec[2] > rec[0]
    # At budget 1.0 the min-cut already reruns pointwise ops (no FLOP formula): ops counted, FLOPs
    # not.
    ops = [compiled_grid[b]["graphs"]["pairs"][0]["recompute_ops"] for b in BUDGETS]
    assert rec[0] == 0 and 0 < ops[0] < ops[1] <= ops[2]


def test_full_checkpoint_under_compile_reruns_what_eager_full_reruns():
    """Block-scope compile of strategy full: the backward graph's forward nodes are the checkpoint's
    rerun, with the
    FLOPs the eager meta count gives (non-reentrant early stop: the block minus mlp.proj)."""
    from recompute_lab.measure import compiled
    from recompute_lab.measure import flops

    cfg, _, session, model = _session(None, scope="block", strategy="full")
    idx, tgt = _batch()
    session.first_step(lambda: model(idx, tgt).backward(), "test")
    graphs = compiled.graph_measurements(session.recorder)
    torch._dynamo.reset()
    assert graphs["calls"] == 2  # one graph, run by both blocks
    assert graphs["recompute"] == flops.count_step_flops(RunSpec.of(cfg))["recompute"] > 0


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["compile.memory_budget=0.5"], "needs compile.backend"),
        (["compile=eager_partition", "compile.memory_budget=0"], "compile.memory_budget must be"),
        (["compile=eager_partition", "compile.memory_budget=1.5"], "compile.memory_budget must be"),
    ],
)
def test_bad_compile_options_are_refused_with_the_valid_choices(overrides, needle):
    from recompute_lab.config import ConfigError, validate

    with pytest.raises(ConfigError, match=needle):
        validate(compose_config([*SHAPE, *overrides]))


def test_unknown_backend_and_option_name_the_valid_ones(tmp_path):
    proc = run_cli(["compile.backend=jit", *FAST, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert proc.returncode != 0 and "aot_eager_decomp_partition" in proc.stderr
    proc = run_cli(["compile.budget=0.5", *FAST, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)
    assert proc.returncode != 0 and "memory_budget" in proc.stderr


# No W&B, no progress bar, but the paired time overhead kept on (a measurement compiled runs must
# still give).
CLI = [
    *SHAPE,
    "trainer.steps=2",
    "trainer.warmup_steps=0",
    "trainer.overhead.enabled=true",
    "trainer.overhead.min_rounds=6",
    "trainer.overhead.max_rounds=6",
    "logger=none",
    "trainer.progress=false",
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The real CLI, compiled with the eager-kernel backend, for none / full / budget (one multirun,
    one process)."""
    tmp = tmp_path_factory.mktemp("compiled_cli")
    proc = run_cli(
        [
            "-m",
            "compile=eager_partition",
            "+strategy=none,full,budget",
            *CLI,
            f"hydra.sweep.dir={tmp / 'sweep'}",
            "hydra.callbacks.analyze.enabled=false",
        ],
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for path in (tmp / "sweep").glob("*/results.json"):
        res = load_results(path)
        runs[res["config"]["strategy"]["name"]] = res
    return runs


@pytest.mark.parametrize("strategy", ["none", "full", "budget"])
def test_compiled_cli_run_writes_complete_results(cli_runs, strategy):
    from recompute_lab.measure import flops

    res = cli_runs[strategy]
    assert res["status"] == "ok", res.get("error")
    comp = res["compile"]
    assert comp["backend"] == "aot_eager_decomp_partition" and comp["graphs"] >= 1
    assert comp["gradient_check"]["ok"] is True and comp["gradient_check"]["max_rel_diff"] <= 1e-4
    act = res["memory"]["activation_bytes"]
    assert (
        act["measured"] > act["graph_count"]["total"] > 0
    )  # block scope: embedding, head and loss stay eager
    peak = res["memory"]["peak_bytes"]
    assert (
        peak["measured"] is None and "MemTracker" in peak["reason"]
    )  # CPU: no peak under compile, and why
    ps = res["flops"]["per_step"]
    assert ps["recompute"] is not None and res["flops"]["recompute_overhead"] is not None
    assert res["time"]["compile_s"] > 0 and res["time"]["step_s_median"] > 0
    assert (
        res["time"]["compile_s"] > 10 * res["time"]["step_s_median"]
    )  # compile time is not in step time
    ov = res["time"]["overhead"]  # against eager none, also for compiled none (not 1 by definition)
    assert (
        ov["rounds"] >= 6
        and ov["ci95_low"] <= ov["ratio"] <= ov["ci95_high"]
        and "eagerly" in ov["baseline_note"]
    )
    if strategy == "full":  # the checkpoint's rerun is what the graphs recompute
        cfg = compose_config([*SHAPE, "+strategy=full"])
        assert ps["recompute"] == flops.count_step_flops(RunSpec.of(cfg))["recompute"]


def test_compiled_full_saves_less_than_compiled_none(cli_runs):
    saved = {k: r["memory"]["activation_bytes"]["measured"] for k, r in cli_runs.items()}
    assert saved["full"] < saved["budget"] < saved["none"]


@pytest.mark.slow
def test_inductor_run_measures_saved_bytes_and_says_why_no_flops(tmp_path):
    proc = run_cli(
        ["compile=inductor", "+strategy=full", *CLI, f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = load_results(tmp_path / "r" / "results.json")
    assert res["status"] == "ok" and res["compile"]["gradient_check"]["ok"] is True
    assert res["memory"]["activation_bytes"]["measured"] > 0
    assert (
        res["flops"]["per_step"]["recompute"] is None
        and "inductor" in res["flops"]["recompute_reason"]
    )


def test_estimate_refuses_a_compiled_config_rather_than_predict_eager_bytes():
    from recompute_lab.config import ConfigError, EstimateConfig
    from recompute_lab.cli.estimate import estimate

    with pytest.raises(ConfigError, match="estimate predicts eager runs"):
        estimate(compose_config([*SHAPE, "compile=eager_partition"]), EstimateConfig())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_compiled_blocks_under_ddp_and_fsdp(tmp_path, kind):
    """Compile comes after the strategy and before DDP / FSDP2 (torchtitan's order): two CPU ranks
    run it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "recompute_lab.cli.train",
        f"parallel={kind}",
        "compile=eager_partition",
        "+strategy=full",
        *CLI,
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = load_results(tmp_path / "r" / "results.json")
    assert res["status"] == "ok" and res["compile"]["gradient_check"]["ok"] is True
    cfg = compose_config([*SHAPE, "+strategy=full"])
    from recompute_lab.measure import flops

    assert (
        res["flops"]["per_step"]["recompute"]
        == flops.count_step_flops(RunSpec.of(cfg))["recompute"]
    )

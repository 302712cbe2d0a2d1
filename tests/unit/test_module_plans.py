"""Module-level plans made without a model (recompute_lab.predict.module_plans) against the plans
the strategies apply to a meta model, and the torch-free estimate that uses them against the one
that builds a meta replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from recompute_lab.cli.estimate import estimate
from recompute_lab.config import EstimateConfig
from recompute_lab.config.spec import RunSpec
from recompute_lab.model.gpt import build_model
from recompute_lab.predict import module_plans
from recompute_lab.predict.module_plans import module_plan
from recompute_lab.strategies import apply_strategy

from conftest import ROOT, compose_config

STRATEGY_OVERRIDES = [
    ["+strategy=none"],
    ["+strategy=full"],
    ["+strategy=selective"],
    ["+strategy=selective", "strategy.modules=[attn,core_attn,norm]"],
    ["+strategy=selective", "strategy.modules=[mlp,norm,mlp]"],
    ["+strategy=layers", "strategy.method=uniform", "strategy.num_layers=2"],
    ["+strategy=layers", "strategy.method=block", "strategy.num_layers=1"],
    ["+strategy=layers", "strategy.method=every", "strategy.every=2"],
    ["+strategy=sqrt"],
]


@pytest.mark.cover("model", "overrides")
@pytest.mark.parametrize("model", [["model=tiny"], ["model=tiny", "model.n_layer=5"]])
@pytest.mark.parametrize("overrides", STRATEGY_OVERRIDES, ids=lambda o: " ".join(o))
def test_a_plan_made_without_a_model_is_the_plan_applied_to_one(model, overrides):
    spec = RunSpec.of(compose_config([*model, *overrides]))
    applied = apply_strategy(build_model(spec.model, "meta"), spec.strategy)
    assert module_plan(spec.strategy, spec.model.n_layer).to_dict() == applied.to_dict()


def test_strategies_that_need_a_model_get_no_plan_here():
    for name in ("op", "regions", "offload", "budget"):
        spec = RunSpec.of(compose_config(["model=tiny", f"+strategy={name}"]))
        assert module_plan(spec.strategy, spec.model.n_layer) is None


def test_bad_options_are_refused_as_when_applied():
    spec = RunSpec.of(compose_config(["model=tiny", "+strategy=layers", "strategy.num_layers=9"]))
    with pytest.raises(Exception, match=r"out of range for model.n_layer=2; valid values: 1..2"):
        module_plan(spec.strategy, spec.model.n_layer)


GRID = [
    (precision, strategy)
    for precision in ("fp32", "bf16_autocast", "bf16_master")
    for strategy in ("none", "full", "selective", "layers", "sqrt")
]


@pytest.mark.cover("precision", "strategy")
@pytest.mark.parametrize("precision,strategy", GRID)
def test_the_torch_free_estimate_equals_the_meta_replica_one(monkeypatch, precision, strategy):
    """Same dict, byte for byte, whether the plan and parameter count come from the options and
    shapes or from a meta model with the strategy applied (the path every other strategy takes)."""
    cfg = compose_config(
        ["model=small", "data.seq_len=64", f"precision={precision}", f"+strategy={strategy}"]
    )
    est = EstimateConfig(seq_lens=[64, 128])
    fast = estimate(cfg, est)
    monkeypatch.setattr(module_plans, "MODULE_STRATEGIES", ())  # every strategy builds a replica
    slow = estimate(cfg, est)
    assert json.dumps(fast, sort_keys=True) == json.dumps(slow, sort_keys=True)


NO_TORCH = """
import runpy, sys
sys.argv = ["recompute-lab-estimate", *sys.argv[1:]]
try:
    runpy.run_module("recompute_lab.estimate", run_name="__main__")
finally:
    print("TORCH_IMPORTED", "torch" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize(
    "overrides,torch_expected",
    [
        (["model=llama3_405b", "data.seq_len=8192", "+strategy=full"], False),
        (["model=llama3_8b", "+strategy=selective", "precision=bf16_autocast"], False),
        (["model=tiny", "+strategy=full", "estimate.cross_check=true"], True),
        pytest.param(["model=tiny", "+strategy=op"], True, marks=pytest.mark.slow),
    ],
)
def test_an_estimate_the_theory_answers_imports_no_torch(tmp_path, overrides, torch_expected):
    """The real command in a fresh process: torch (1-2.5 s to import here) only where a meta
    replica is needed (a cross-check, a strategy without a closed-form plan)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"TORCH_IMPORTED {torch_expected}" in proc.stderr
    assert (tmp_path / "estimate.json").exists()

"""docs/contributing.md's "How to add a strategy", done from this file: one module's worth of code
(an options
dataclass and an
@register apply function) and one config (here stored in Hydra's ConfigStore, as
conf/strategy/NAME.yaml would
be). The new strategy then runs through train, theory, the FLOP count and the analysis with no other
edit."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from hydra.core.config_store import ConfigStore

from recompute_lab.analysis.aggregate import load_rows
from recompute_lab.config import ConfigError, StrategyConfig
from recompute_lab.run.engine import run
from recompute_lab.model.gpt import build_model
from recompute_lab.strategies import Plan, Shape, apply_strategy, register
from recompute_lab.strategies.base import check_range, unregister
from recompute_lab.strategies.wrap import checkpoint_module
from recompute_lab.config.spec import RunSpec

from conftest import FAST, compose_config

NAME = "mlp_stride"


@dataclass
class MlpStrideConfig(StrategyConfig):
    name: str = NAME
    stride: int = 2  # checkpoint the MLP of every stride-th block, counting from block 0


def apply_mlp_stride(model, opts: MlpStrideConfig, shape: Shape) -> Plan:
    check_range("stride", opts.stride, len(model.blocks))
    recomputed = []
    for i in range(0, len(model.blocks), opts.stride):
        checkpoint_module(model.blocks[i].mlp)
        recomputed.append(f"blocks.{i}.mlp")
    return Plan(
        NAME,
        f"the MLP of every {opts.stride}-th block reruns in backward",
        recomputed=recomputed,
        saved=["everything but the recomputed MLPs' insides"],
    )


@pytest.fixture
def toy_strategy():
    register(NAME, MlpStrideConfig)(apply_mlp_stride)  # the module's @register line
    ConfigStore.instance().store(
        group="strategy", name=NAME, node=MlpStrideConfig
    )  # conf/strategy/NAME.yaml
    yield
    unregister(NAME)
    ConfigStore.instance().repo["strategy"].pop(f"{NAME}.yaml", None)


RUN = [
    "model.n_layer=3",
    "model.dropout=0.1",
    "data.seq_len=16",
    "data.batch_size=2",
    "trainer.steps=2",
    "trainer.num_threads=1",
    *FAST,
]


def test_a_new_strategy_runs_through_train_theory_flops_and_analysis(toy_strategy, tmp_path):
    base = run(compose_config([*RUN, "+strategy=none"]), tmp_path / "none")
    res = run(compose_config([*RUN, f"+strategy={NAME}", "strategy.stride=3"]), tmp_path / NAME)
    assert base["status"] == res["status"] == "ok", res.get("error")
    assert res["strategy"]["recomputed"] == ["blocks.0.mlp"]
    act, fl = res["memory"]["activation_bytes"], res["flops"]
    assert (
        act["predicted"] == act["measured"] < base["memory"]["activation_bytes"]["measured"]
    )  # theory: exact
    assert (
        fl["predicted_per_step"]["recompute"] == fl["per_step"]["recompute"] > 0
    )  # FLOP formula: exact
    rows = {r["strategy"]: r for r in load_rows(tmp_path)}
    assert set(rows) == {
        "none",
        f"{NAME}(stride=3)",
    }  # its label comes from its own schema's defaults
    assert (
        rows[f"{NAME}(stride=3)"]["act_saved_frac"] > 0
        and rows[f"{NAME}(stride=3)"]["baseline"] == "none"
    )


def test_a_new_strategy_keeps_the_gradients_and_its_options_are_checked(toy_strategy):
    cfg = compose_config([*RUN, f"+strategy={NAME}", "strategy.stride=1"])
    torch.manual_seed(0)
    base = build_model(cfg.model).train()
    model = copy.deepcopy(base)
    apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape())
    grads = []
    for m in (base, model):
        torch.manual_seed(1)
        idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
        m(idx, idx).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) == 0.0
    with pytest.raises(ConfigError, match="valid values: 1..3"):
        apply_strategy(build_model(cfg.model), {"name": NAME, "stride": 9})
    with pytest.raises(
        ConfigError,
        match=f"strategy.num_layers is not an option of strategy '{NAME}'; its "
        "options: stride, offload",
    ):
        apply_strategy(build_model(cfg.model), {"name": NAME, "num_layers": 2})


def test_the_documented_example_registers_a_working_strategy():
    """The code block of docs/contributing.md's "How to add a strategy" runs as written (its imports
    exist), registers its strategy, and the strategy applies; the files the steps name exist."""
    import re
    import sys
    import types

    from conftest import ROOT
    from docs_text import page, section

    text = section(page("contributing"), "## How to add a strategy")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("docs_example")  # dataclasses look their module up in sys.modules
    sys.modules[module.__name__] = module
    try:
        source = "\n".join(ln[3:] for ln in code.splitlines())  # the list item's indent
        exec(compile(source, "docs/contributing.md", "exec"), module.__dict__)
        ConfigStore.instance().store(group="strategy", name=NAME, node=module.MlpStrideConfig)
        cfg = compose_config([*RUN, f"+strategy={NAME}", "strategy.stride=2"])
        plan = apply_strategy(build_model(cfg.model), cfg.strategy, RunSpec.of(cfg).shape())
        assert plan.recomputed == ["blocks.0.mlp", "blocks.2.mlp"]
        with pytest.raises(ConfigError, match="valid values: 1..3"):
            apply_strategy(build_model(cfg.model), {"name": NAME, "stride": 9})
    finally:
        sys.modules.pop(module.__name__)
        unregister(NAME)
        ConfigStore.instance().repo["strategy"].pop(f"{NAME}.yaml", None)
    paths = re.findall(r"`((?:recompute_lab|conf|tests)/[\w/.]+)`", text)
    paths += re.findall(r"[ (](tests/[\w/]+\.py)", text)
    assert len(paths) >= 5, paths
    for path in paths:  # NAME stands for the new strategy: its folder must exist
        assert (ROOT / path.replace("NAME.py", "").replace("NAME.yaml", "")).exists(), path

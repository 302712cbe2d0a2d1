"""The typed boundary (recompute_lab.config.spec): a composed config becomes one frozen RunSpec,
once; one Shape
describes a micro-batch for every prediction and strategy."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from recompute_lab.config import GROUPS, ConfigError, EstimateConfig
from recompute_lab.config.spec import AUTOCAST_BYTES, PARAM_BYTES, RunSpec, Shape, plain_config
from recompute_lab.model.precision import POLICIES, shape_dtypes


def test_spec_holds_each_group_once_typed_and_frozen():
    assert [f.name for f in dataclasses.fields(RunSpec)] == [*GROUPS, "estimate"]
    spec = RunSpec.of(
        compose_config(["+strategy=layers", "strategy.num_layers=2", "optimizer.lr=0.01"])
    )
    for name, schema in GROUPS.items():
        assert isinstance(getattr(spec, name), schema), name
    assert type(spec.strategy).__name__ == "LayersConfig" and spec.strategy.num_layers == 2
    assert (
        spec.data.seq_len == spec.model.max_seq_len
    )  # the ${model.max_seq_len} interpolation, resolved
    assert isinstance(spec.optimizer.betas, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.model.n_layer = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.strategy.num_layers = 3
    changed = spec.replace(model__n_layer=3)
    assert (
        changed.model.n_layer == 3 and spec.model.n_layer == 2
    )  # a new spec; the old one is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.model.n_layer = 4


def test_spec_is_made_from_a_copy_and_round_trips_to_the_record():
    cfg = compose_config(["model=hf", "model.hf.config=llama3_8b", "model.n_layer=2"])
    spec = RunSpec.of(cfg)
    assert spec.model.name == "hf:llama3_8b" and spec.model.hf.model_type == "llama"
    assert (
        cfg.model.name == "hf" and cfg.model.hf.model_type is None
    )  # the composed config is not mutated
    assert plain_config(spec) == spec.to_dict()
    assert (
        RunSpec.of(OmegaConf.create(spec.to_dict())) == spec
    )  # a record's config gives the same spec back
    assert RunSpec.of(spec) is spec


def test_invalid_configs_and_strategy_options_are_config_errors():
    with pytest.raises(ConfigError, match="n_head"):
        RunSpec.of(compose_config(["model.n_head=5"]))
    with pytest.raises(ConfigError, match="budget_fraction"):
        RunSpec.of(compose_config(["+strategy=budget", "strategy.budget_fraction=2"]))


def test_shape_byte_widths_are_the_precision_policies():
    for name in POLICIES:
        shape = Shape(1, 1, name)
        param, autocast = shape_dtypes(shape)
        assert shape.param_bytes == PARAM_BYTES[name] == param.itemsize
        assert (
            shape.autocast_bytes
            == AUTOCAST_BYTES.get(name)
            == (None if autocast is None else autocast.itemsize)
        )
    assert Shape(2, 8, "bf16_autocast").compute_bytes == torch.bfloat16.itemsize
    spec = RunSpec.of(compose_config(["precision=bf16_master", "optimizer.grad_clip=0"]))
    assert spec.shape("cuda", "fsdp", 4, 3) == Shape(
        8, 64, "bf16_master", False, "cuda", False, None, "fsdp", 4, 3
    )


def test_estimate_options_are_typed_too():
    spec = RunSpec(estimate=EstimateConfig(seq_lens=[128, 256]))
    assert spec.estimate.seq_lens == (128, 256)

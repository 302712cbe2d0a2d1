"""Inputs that used to be accepted silently (issue 31) are refused with a message naming the valid
choices: an optimizer that is not built, a compile scope with nothing compiled, a vocabulary of one
token, a memory snapshot on a device that has none, a nan device size for the estimate."""

from __future__ import annotations

import pytest

from recompute_lab.config import ConfigError, validate

from conftest import FAST, compose_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.name=sgd", r"optimizer.name='sgd' is not implemented; valid: adamw"),
        ("compile.scope=model", r"compile.scope=model .* needs compile.backend set to one of"),
        ("model.vocab_size=1", r"model.vocab_size=1: .* use at least 2"),
    ],
)
def test_silently_accepted_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([override]))


def test_their_valid_neighbours_still_validate():
    validate(compose_config(["optimizer.name=adamw", "model.vocab_size=2"]))
    validate(compose_config(["compile=eager_partition", "compile.scope=model"]))


def test_memory_snapshot_on_cpu_is_refused_before_the_run_starts(tmp_path):
    from recompute_lab.run import engine

    cfg = compose_config(["trainer.memory_snapshot=true", "trainer.device=cpu", *FAST])
    with pytest.raises(ConfigError, match="CUDA caching allocator.*valid here"):
        engine.run(cfg, tmp_path)
    # refused before the start: the empty folder gets an error record, never a running one
    import json

    assert json.loads((tmp_path / "results.json").read_text())["status"] == "error"


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_estimate_device_size_is_checked_without_a_layout(value):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from recompute_lab.cli.estimate import estimate
    from recompute_lab.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="estimate", overrides=[f"estimate.layout.device_gb={value}"])
    with pytest.raises(ConfigError, match="estimate.layout.device_gb must be a finite number > 0"):
        estimate(cfg, cfg.estimate)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hf.config=llama3_8b"], r"model.hf.config applies to model=hf only .*tiny"),
        (["model=small", "+model.hf.family=llama"], r"applies to model=hf only"),
        (["model=hf", "model.norm=layernorm"], r"model.norm: with model=hf the Hugging Face"),
        (["local=nope"], r"local=nope: no conf/local/nope.yaml; valid: example"),
        (["local.trainer=1"], r"local.trainer is not a config key"),
    ],
)
def test_overrides_that_did_nothing_are_refused(overrides, message):
    """model.hf.* without model=hf and model.norm on model=hf used to be accepted and ignored;
    a conf/local/ file that does not exist is named with the ones that do (issue 31, item 12)."""
    from recompute_lab.cli.overrides import check_overrides

    with pytest.raises(ConfigError, match=message):
        check_overrides(overrides)


def test_documented_local_example_and_hf_settings_pass_the_checks():
    """README documents local=NAME (conf/local/example.yaml); it was refused as an unknown key."""
    from recompute_lab.cli.overrides import check_overrides

    for ok in (
        ["local=example"],
        ["~local"],
        ["model=hf", "model.hf.config=gpt2", "model.n_layer=2"],
        ["model=hf,tiny", "model.hf.config=gpt2"],
    ):
        check_overrides(ok)
    compose_config(["local=example"])  # and Hydra composes it

"""Config tree: every option of every group composes and validates; bad input fails with a readable
message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from recompute_lab.config import ConfigError, validate

from conftest import CONF_DIR, compose_config

GROUPS = ["model", "precision", "data", "optimizer", "trainer", "logger", "strategy"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    prefix = "+" if group == "strategy" else ""
    cfg = compose_config([f"{prefix}{group}={option}"])
    if (group, option) == (
        "model",
        "hf",
    ):  # fields filled from the Hugging Face config (the optional extra)
        pytest.importorskip("transformers")
        from recompute_lab.model.hf import resolve_model

        resolve_model(cfg)
    validate(cfg)
    if group == "strategy":
        assert cfg.strategy.name == option
    if group == "model":
        assert cfg.model.name == option or cfg.model.name.startswith(f"{option}:")
        assert (
            cfg.data.seq_len == cfg.model.max_seq_len
        )  # default context = the model's position table


def test_strategy_defaults_to_none_and_is_not_in_defaults():
    cfg = compose_config([])
    assert cfg.strategy.name == "none"
    with pytest.raises(ConfigCompositionException, match=r"\+strategy=full"):
        compose_config(["strategy=full"])  # the documented form is +strategy=full


def test_unknown_strategy_names_the_valid_ones():
    with pytest.raises(MissingConfigException) as e:
        compose_config(["+strategy=fulll"])
    assert "full" in str(e.value) and "none" in str(e.value)


def test_misspelt_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["model.n_layr=3"])
    assert "n_layr" in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize(
    "override,valid",
    [
        ("model.attention=flash", "sdpa"),
        ("model.norm=batchnorm", "rmsnorm"),
        ("trainer.device=tpu", "cuda"),
    ],
)
def test_wrong_enum_value_names_valid_values(override, valid):
    with pytest.raises(ConfigCompositionException) as e:
        compose_config([override])
    msg = str(e.value.__cause__ or e.value)
    assert valid in msg


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["model.n_layer=two"])
    assert isinstance(e.value.__cause__, ValidationError)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.n_head=7"], "does not divide"),
        (["data.seq_len=65"], "max_seq_len"),
        (["model.n_layer=0"], "positive"),
        (["data.batch_size=-1"], "positive"),
        (["model.dropout=1.5"], "dropout"),
        (["model=tiny", "model.n_kv_head=3"], "n_kv_head"),
        (["data=text", "model.vocab_size=100"], "vocab"),
    ],
)
def test_cross_field_rules(overrides, needle):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=needle):
        validate(cfg)

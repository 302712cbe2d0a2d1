"""The suite's compose shortcut (tests/conftest.py ``compose_config``) gives what Hydra's own
compose gives.

The shortcut applies value overrides to the cached composition of the group overrides instead of
composing again. Here each case is composed both ways and compared: the config's YAML, its struct
flag, the type behind each typed node (a strategy's schema, the root schema), and for overrides
Hydra refuses, the same error type and message.
"""

from __future__ import annotations

import pytest
from conftest import _composed, _split_overrides, compose_config, hydra_compose
from omegaconf import OmegaConf

CASES = [
    (),
    ("trainer.steps=3",),
    ("model=small", "data.seq_len=32", "data.batch_size=3"),
    ("+strategy=full", "trainer.steps=2", "precision=bf16_master"),
    ("+strategy=layers", "strategy.every=3", "strategy.method=every", "model.n_layer=4"),
    ("+strategy=budget", "strategy.budget_fraction=0.5", "trainer.probe=false"),
    ("trainer.steps=4", "trainer.steps=5"),  # applied in order: the last wins
    ("~trainer.probe",),  # deletion of a value
    ("+trainer.extra_key=1",),  # an addition the schema refuses
    ("++data.seq_len=48",),  # force-add of an existing key
    ("logger=none", "data.path=${oc.env:HOME}"),  # an interpolation kept unresolved
    ("trainer.no_such_key=1",),  # refused: not in the schema
    ("trainer.steps=many",),  # refused: wrong type
    ("model=no_such_model", "trainer.steps=2"),  # refused: no such option in the group
    ("trainer.steps=[1,2",),  # refused: does not parse
]


def _types(cfg) -> dict:
    out = {}
    for key in cfg:
        node = cfg._get_node(key)
        if OmegaConf.is_dict(node):
            out[key] = OmegaConf.get_type(node)
    return out


def _hydra(overrides):
    try:
        return hydra_compose(overrides), None
    except Exception as e:  # noqa: BLE001 - compared with the shortcut's error below
        return None, e


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(o) or "defaults")
def test_the_shortcut_composes_what_hydra_composes(overrides):
    want, error = _hydra(list(overrides))
    if error is not None:
        with pytest.raises(type(error)) as got:
            compose_config(list(overrides))
        assert str(got.value) == str(error)
        return
    got = compose_config(list(overrides))
    assert OmegaConf.to_yaml(got) == OmegaConf.to_yaml(want)
    assert OmegaConf.is_struct(got) == OmegaConf.is_struct(want)
    assert OmegaConf.get_type(got) == OmegaConf.get_type(want)
    assert _types(got) == _types(want)


def test_value_overrides_reuse_the_group_composition():
    groups, configs = _split_overrides(["model=small", "trainer.steps=3", "+strategy=full"])
    assert groups == ["model=small", "+strategy=full"]
    assert [o.input_line for o in configs] == ["trainer.steps=3"]
    assert _split_overrides(["trainer.steps=1,2"]) is None  # a sweep: only Hydra stands for it
    assert _split_overrides(["hydra.run.dir=x"]) is None
    base = _composed(("model=small", "+strategy=full"))
    a = compose_config(["model=small", "+strategy=full", "trainer.steps=3"])
    assert a.trainer.steps == 3 and base.trainer.steps != 3  # the cached base is never changed
    a.trainer.steps = 7  # nor by what a caller does with its copy
    assert compose_config(["model=small", "+strategy=full", "trainer.steps=3"]).trainer.steps == 3

"""The budget planner's per-process prices (recompute_lab.strategies.budget.probe._PRICED): a
second ask with the same configuration and shape returns what a fresh pricing measures, without
running the replicas; anything the replicas depend on (a model field, the micro-batch, the dtype,
the device, the option list) is a new question; callers get copies."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from conftest import cached_compose, one_thread_fixture
from recompute_lab.config.spec import RunSpec
from recompute_lab.model.gpt import build_model
from recompute_lab.strategies.budget.options import block_options

# the module (the package's `probe` attribute is its function of that name)
P = importlib.import_module("recompute_lab.strategies.budget.probe")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)
MODEL = ("model=tiny", "model.n_layer=2", "data.seq_len=32", "data.batch_size=2")


def model_and_shape(*extra: str, device: str = "meta"):
    cfg = cached_compose(*MODEL, "+strategy=budget", *extra)
    return build_model(cfg.model, device).train(), RunSpec.of(cfg).shape()


def few(model):
    """none and two more options: the cache's logic is per option list, and a short list prices
    fast (each option runs its replicas' forward and backward on meta)."""
    return block_options(model)[:3]


def ask(model, shape, options=None):
    options = options if options is not None else few(model)
    return P.probe(model, options, shape.batch, shape.seq, torch.float32, None, "cpu")


def measured_now(model, shape):
    """An independent pricing: the replicas run again, no cache."""
    return P._probe(model, few(model), shape.batch, shape.seq, torch.float32, None, "cpu")


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(P, "_PRICED", {})
    runs = []
    real = P._probe
    monkeypatch.setattr(P, "_probe", lambda *a: runs.append(1) or real(*a))
    return runs


def test_a_second_ask_is_the_first_answer_without_replicas(fresh_cache):
    model, shape = model_and_shape()
    first = ask(model, shape)
    again = ask(build_model(model.cfg, "meta").train(), shape)  # another model object, same config
    assert fresh_cache == [1] and again == first
    # the cached figures are what a pricing measures now (an independent run of the replicas)
    assert measured_now(model, shape) == first
    again[1][0].bytes += 1  # a caller's change does not reach the cache
    assert ask(model, shape) == first and fresh_cache == [1, 1]


def test_what_the_replicas_depend_on_is_a_new_question(fresh_cache):
    model, shape = model_and_shape()
    ask(model, shape)
    changes = ("model.d_ff=48", "data.seq_len=16", "data.batch_size=1", "model.attention=eager")
    for i, change in enumerate(changes):
        other, other_shape = model_and_shape(change)
        answer = ask(other, other_shape)
        assert len(fresh_cache) == i + 2, change  # priced, not read
    assert answer == measured_now(other, other_shape)


def test_options_dtype_and_device_are_part_of_the_question(fresh_cache):
    model, shape = model_and_shape()
    options = few(model)
    ask(model, shape, options)
    ask(model, shape, options[:2])
    P.probe(model, options, shape.batch, shape.seq, torch.bfloat16, None, "cpu")
    cpu_model, _ = model_and_shape(device="cpu")
    P.probe(cpu_model, options, shape.batch, shape.seq, torch.float32, None, None)
    assert len(fresh_cache) == 4
    assert all(dataclasses.is_dataclass(p) for p in ask(model, shape, options)[1])
    assert len(fresh_cache) == 4

"""Model shapes and parameter counts against the published sizes."""

from __future__ import annotations

import pytest
import torch

from recompute_lab.model.gpt import build_model

from conftest import compose_config


@pytest.mark.parametrize(
    "name,expected",
    [
        ("gpt2_small", 124_439_808),  # GPT-2 124M (tied head, 1024 learned positions)
        ("llama3_1b", 1_235_814_400),  # Llama 3.2 1B (tied)
        ("llama3_8b", 8_030_261_248),  # Llama 3 8B
        ("llama3_70b", 70_553_706_496),  # Llama 3 70B
    ],
)
def test_published_parameter_counts_on_meta(name, expected):
    cfg = compose_config([f"model={name}"])
    model = build_model(cfg.model, device="meta")
    assert model.get_num_params() == expected


def test_small_is_about_20m():
    model = build_model(compose_config(["model=small"]).model, device="meta")
    assert 18e6 < model.get_num_params() < 25e6


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.attention=eager"],
        ["model.attention=sdpa"],
        ["model.norm=rmsnorm", "model.mlp=swiglu", "model.positions=rope", "model.bias=false"],
        ["model.n_kv_head=2", "model.attention=eager"],
        ["model.n_kv_head=2"],
        ["model.tie_embeddings=false"],
    ],
)
def test_forward_shapes_and_loss(overrides):
    cfg = compose_config(["model=tiny", *overrides])
    model = build_model(cfg.model)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    assert model(idx).shape == (2, 16, cfg.model.vocab_size)
    loss = model(idx, torch.randint(0, cfg.model.vocab_size, (2, 16)))
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_eager_and_sdpa_agree():
    torch.manual_seed(0)
    eager = build_model(compose_config(["model.attention=eager", "model.positions=rope"]).model)
    sdpa = build_model(compose_config(["model.attention=sdpa", "model.positions=rope"]).model)
    sdpa.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(eager(idx), sdpa(idx), atol=1e-5, rtol=1e-5)


def test_stable_module_names():
    model = build_model(compose_config([]).model)
    names = dict(model.named_modules())
    for n in [
        "blocks.0.norm1",
        "blocks.0.attn.qkv",
        "blocks.0.attn.core",
        "blocks.0.attn.out",
        "blocks.0.norm2",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.act",
        "blocks.0.mlp.proj",
        "norm_f",
        "head",
    ]:
        assert n in names

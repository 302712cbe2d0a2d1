"""Hugging Face transformers as the reference: GPT-2 and Llama built from configs (random init,
nothing downloaded)
at the same shapes as recompute_lab's gpt (mlp=gelu_tanh) and its Llama-style options. Saved bytes
(an independent
retained-storage count on HF; recompute_lab's theory and measurement on ours) and FlopCounterMode
FLOPs agree for
no recomputation and full recomputation (``gradient_checkpointing_enable(use_reentrant=False)``,
HF's per-layer
checkpoint), with ``use_cache=False``, up to the differences named in ``named_differences``, each
exact.

Skipped without the optional ``hf`` extra (pip install -e '.[hf]').
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from recompute_lab.measure import flops

from recompute_lab.predict import theory
from recompute_lab.measure.memory import saved_tensors
from recompute_lab.model.gpt import build_model
from recompute_lab.strategies import apply_strategy
from recompute_lab.strategies.budget import CPU_SDPA_FLOPS
from recompute_lab.config.spec import Shape
from recompute_lab.config.spec import RunSpec

from conftest import compose_config, one_thread_fixture, retained_bytes

transformers = pytest.importorskip("transformers")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)
B, S = 2, 16
SHAPE = [
    "model=tiny",
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.vocab_size=256",
    "model.max_seq_len=64",
    f"data.batch_size={B}",
    f"data.seq_len={S}",
]
OURS = {
    "gpt2": [*SHAPE, "model.d_ff=256", "model.mlp=gelu_tanh"],
    "llama": [
        *SHAPE,
        "model.d_ff=128",
        "model.n_kv_head=2",
        "model.norm=rmsnorm",
        "model.mlp=swiglu",
        "model.positions=rope",
        "model.bias=false",
        "model.tie_embeddings=false",
    ],
}


def hf_model(kind: str, attention: str):
    """HF's model with the same shapes, dropout 0, train mode."""
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            vocab_size=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            attn_implementation=attention,
        )
        return transformers.GPT2LMHeadModel(config).train()
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attention,
    )
    return transformers.LlamaForCausalLM(config).train()


def checkpoint_layers(hf) -> None:
    with (
        warnings.catch_warnings()
    ):  # renamed activation_checkpointing_enable in transformers 5, same behaviour
        warnings.simplefilter("ignore", FutureWarning)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def named_differences(kind: str, attention: str, strategy: str, cfg) -> dict[str, int]:
    """HF's saved bytes minus ours, term by term (fp32, CPU; n tokens, L layers, c = 4 B)."""
    n, L, h, f, hd = B * S, cfg.n_layer, cfg.d_model, cfg.d_ff, cfg.d_model // cfg.n_head
    out = {}
    if kind == "gpt2" and strategy == "none":
        # gelu_new in Python, 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), keeps tanh's
        # output,
        # 1 + tanh and 0.5 * x besides x; our gelu_tanh is one aten.gelu kernel keeping x only.
        out["gelu_new keeps three more (b, s, d_ff) tensors per layer"] = 3 * n * f * 4 * L
    if attention == "eager" and strategy == "none":
        # Our masked_fill keeps the bool ~causal[:s, :s] per layer; HF adds a float mask (add keeps
        # nothing).
        out["our bool (s, s) causal mask per layer"] = -S * S * L
    if attention == "eager" and strategy == "full":
        # HF passes its float (b, 1, s, s) additive mask into every checkpointed layer: one storage,
        # kept once.
        out["HF's float (b, 1, s, s) mask, a checkpointed layer input"] = B * S * S * 4
    if kind == "llama":
        # HF computes RoPE's cos and sin once per forward, fp32 (1, s, head_dim), kept by every
        # layer's muls or held
        # as checkpointed-layer inputs; ours are buffers (not activations).
        out["HF's fp32 cos and sin (1, s, head_dim), once"] = 2 * S * hd * 4
        if strategy == "full":
            out["HF's int64 position_ids (1, s), a checkpointed layer input"] = S * 8
        if attention == "sdpa" and strategy == "none":
            # Ours: v is a view of the fused qkv projection, so SDPA keeping v keeps the q and k
            # parts too; HF's
            # v_proj output is a storage of its own.
            out["our fused qkv: q and k parts pinned by v's view"] = (
                -n * (cfg.n_head + cfg.n_kv_head) * hd * 4 * L
            )
            # Ours: RoPE's stack() makes q contiguous (b, h, s, d), so the SDPA output needs a copy
            # for the out
            # projection; HF's q * cos + rotate_half(q) * sin keeps q's (b, s, h, d) layout and
            # needs none.
            out["our (b, s, h*d) copy of the attention output"] = -n * h * 4 * L
    return out


def flop_count(fn) -> tuple[int, int]:
    """(forward, backward) FLOPs; the CPU fused SDPA kernel gets the flash-attention formulas."""
    fwd, bwd = (FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) for _ in range(2))
    with fwd:
        loss = fn()
    with bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("strategy", ["none", "full"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_saved_bytes_and_flops_equal_hugging_face(kind, attention, strategy):
    cfg = compose_config([*OURS[kind], f"model.attention={attention}", f"+strategy={strategy}"])
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 256, (B, S)), torch.randint(0, 256, (B, S))
    hf = hf_model(kind, attention)
    if strategy == "full":
        checkpoint_layers(hf)

    def hf_loss():  # our cross-entropy on HF's logits: the same fp32 (b*s, v) input, no label shift
        logits = hf(input_ids=idx, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    hf_bytes, _ = retained_bytes(hf_loss, (*hf.parameters(), *hf.buffers(), idx, targets))
    hf_bytes += (
        2 * B * S * 8
    )  # the int64 ids and targets, made before the forward (left out of the count, which
    # sees them only through views), saved by the embedding and the loss in both models
    ours = build_model(cfg.model).train()
    plan = apply_strategy(ours, cfg.strategy)
    measured = saved_tensors(ours, lambda: ours(idx, targets))
    predicted = theory.predict_activations(cfg.model, Shape(B, S), plan)["total"]
    assert predicted == measured["total"] == measured["resident_total"]
    named = named_differences(kind, attention, strategy, cfg.model)
    assert hf_bytes == measured["total"] + sum(named.values()), named

    hf_flops, our_flops = flop_count(hf_loss), flop_count(lambda: ours(idx, targets))
    assert hf_flops == our_flops
    # recompute_lab's analytic FLOPs (recompute_lab.measure.flops): forward, backward = 2 x forward,
    # + the recompute.
    # FlopCounterMode's flash-attention backward also counts the QK^T it recomputes: 2 b s^2 h per
    # layer.
    want = flops.predict_step_flops(RunSpec.of(cfg), plan)
    flash = 2 * B * S * S * cfg.model.d_model * cfg.model.n_layer if attention == "sdpa" else 0
    assert hf_flops == (want["forward"], want["backward"] + want["recompute"] + flash)
    # ... and the meta-device count every run records (SDPA on meta takes the math path: no flash
    # term).
    counted = flops.count_step_flops(RunSpec.of(cfg), plan=plan)
    assert (counted["forward"], counted["backward"] + counted["recompute"]) == (
        want["forward"],
        want["backward"] + want["recompute"],
    )


def test_gpt2_use_cache_in_train_mode_keeps_k_and_v_copies():
    """HF's default use_cache=True also applies in train mode: with sdpa it keeps contiguous k and v
    per layer."""
    hf = hf_model("gpt2", "sdpa")
    idx = torch.randint(0, 256, (B, S))
    keep = (*hf.parameters(), *hf.buffers(), idx)
    with_cache, _ = retained_bytes(lambda: hf(input_ids=idx, use_cache=True).logits.sum(), keep)
    without, _ = retained_bytes(lambda: hf(input_ids=idx, use_cache=False).logits.sum(), keep)
    assert with_cache - without == 2 * B * S * 64 * 4 * 2  # k and v, (b, s, h) fp32, two layers


def test_gelu_tanh_is_hugging_faces_gelu_new():
    x = torch.randn(4096, dtype=torch.float64)
    model = build_model(compose_config(OURS["gpt2"]).model)
    ours = model.blocks[0].mlp.act(x)
    assert torch.allclose(ours, transformers.activations.NewGELUActivation()(x), rtol=0, atol=1e-12)
    assert not torch.allclose(ours, F.gelu(x), rtol=0, atol=1e-6)  # and not the exact erf GELU

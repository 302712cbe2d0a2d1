"""What recompute_lab knows about each Hugging Face architecture family: where its decoder layers
are, which of
their submodules play the parts strategies and theory name (attention, its core, MLP, norms), and
how its config
maps onto recompute_lab's own model config where the two architectures agree.

Canonical parts (relative to one decoder layer; recompute_lab.model.gpt's Block uses these names
themselves):

    norm1, attn, attn.qkv, attn.core, attn.out, norm2, mlp, mlp.fc, mlp.act, mlp.proj

``attn.core`` is the attention function (QK^T, mask, softmax, dropout, xV, or one SDPA call):
Hugging Face calls it
as a function, so recompute_lab.model.hf.adapter gives every attention module a ``core`` child that
runs it (a module a
strategy can checkpoint). A part may be several modules (Llama's separate q/k/v projections play
``attn.qkv``).
Families not listed here still run every block-level strategy (their decoder layers are found by
shape); the
strategies that need named submodules say so with a ConfigError.

Layer: config (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from recompute_lab.config import ConfigError

SHAPE_FIELDS = ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "max_seq_len")


@dataclass(frozen=True)
class Family:
    """One architecture family. ``keys``: recompute_lab model field -> the HF config attribute
    holding it
    (None: the family has no such key); ``structure``: which model the theory maps it onto (None:
    none)."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # attribute path of the decoder-layer ModuleList in the base model
    attention: Optional[str]  # the attention module in a layer (its function becomes .core)
    parts: dict[str, tuple[str, ...]]  # canonical part -> module names relative to a layer
    keys: dict[str, Optional[str]] = field(default_factory=dict)
    structure: Optional[str] = None
    disagree: Optional[Callable[[Any], list[str]]] = (
        None  # config -> why the theory's model does not match it
    )
    derived: Optional[Callable[[Any], dict]] = (
        None  # config -> recompute_lab model fields besides shapes
    )

    def canonical(self, rel: str) -> Optional[str]:
        """The canonical part a single relative module name plays (None if it plays none alone)."""
        for part, mods in self.parts.items():
            if mods == (rel,):
                return part
        return None


SHAPE_KEYS = {
    "n_layer": "num_hidden_layers",
    "d_model": "hidden_size",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "d_ff": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings",
}


def _gpt2_disagree(c) -> list[str]:
    out = []
    drops = {"embd_pdrop": c.embd_pdrop, "attn_pdrop": c.attn_pdrop, "resid_pdrop": c.resid_pdrop}
    if len(set(drops.values())) > 1:
        out.append(f"dropout probabilities differ ({drops}); recompute_lab's model has one dropout")
    if c.activation_function not in GPT2_ACTIVATIONS:
        out.append(
            f"activation_function={c.activation_function!r} (known: {', '.join(GPT2_ACTIVATIONS)})"
        )
    if c.reorder_and_upcast_attn or c.add_cross_attention:
        out.append(
            "reorder_and_upcast_attn / add_cross_attention change the attention's saved tensors"
        )
    return out


# GPT-2 activations the theory knows: gelu_new is the tanh approximation written in Python (3 more
# saved tensors
# than one aten.gelu kernel: recompute_lab.predict.hf_theory names them); the others are single
# kernels.
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_derived(c) -> dict:
    drop = (
        c.resid_pdrop
        if c.embd_pdrop == c.attn_pdrop == c.resid_pdrop
        else max(c.embd_pdrop, c.attn_pdrop, c.resid_pdrop)
    )
    return {
        "norm": "layernorm",
        "mlp": GPT2_ACTIVATIONS.get(c.activation_function, "gelu"),
        "positions": "learned",
        "bias": True,
        "tie_embeddings": bool(c.tie_word_embeddings),
        "dropout": float(drop),
        "norm_eps": float(c.layer_norm_epsilon),
    }


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers="h",
    attention="attn",
    parts={
        "norm1": ("ln_1",),
        "attn": ("attn",),
        "attn.qkv": ("attn.c_attn",),
        "attn.core": ("attn.core",),
        "attn.out": ("attn.c_proj",),
        "norm2": ("ln_2",),
        "mlp": ("mlp",),
        "mlp.fc": ("mlp.c_fc",),
        "mlp.act": ("mlp.act",),
        "mlp.proj": ("mlp.c_proj",),
    },
    keys={**SHAPE_KEYS, "n_kv_head": None, "d_ff": "n_inner"},
    structure="gpt2",
    disagree=_gpt2_disagree,
    derived=_gpt2_derived,
)


def rope_theta(c) -> Optional[float]:
    params = getattr(c, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    return None if theta is None else float(theta)


def head_dim(c) -> int:
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def _llama_disagree(c) -> list[str]:
    out = []
    if getattr(c, "attention_dropout", 0.0):
        out.append(
            f"attention_dropout={c.attention_dropout} drops attention probabilities only "
            f"(recompute_lab's "
            "dropout also acts on embeddings and residual branches)"
        )
    if c.hidden_act != "silu":
        out.append(f"hidden_act={c.hidden_act!r} (the theory knows SwiGLU: silu)")
    if head_dim(c) * c.num_attention_heads != c.hidden_size:
        out.append(
            f"head_dim={head_dim(c)} x {c.num_attention_heads} heads != hidden_size={c.hidden_size}"
        )
    if getattr(c, "mlp_bias", False):
        out.append("mlp_bias=true")
    if (getattr(c, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0:
        out.append("partial rotary embeddings")
    return out


def _llama_derived(c) -> dict:
    bias = bool(
        getattr(c, "attention_bias", c.model_type == "qwen2")
    )  # Qwen2's q/k/v projections have biases
    return {
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "positions": "rope",
        "bias": bias,
        "tie_embeddings": bool(c.tie_word_embeddings),
        "dropout": float(getattr(c, "attention_dropout", 0.0)),
        "norm_eps": float(c.rms_norm_eps),
        "rope_theta": rope_theta(c) or 10000.0,
    }


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers="layers",
    attention="self_attn",
    parts={
        "norm1": ("input_layernorm",),
        "attn": ("self_attn",),
        "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn.core": ("self_attn.core",),
        "attn.out": ("self_attn.o_proj",),
        "norm2": ("post_attention_layernorm",),
        "mlp": ("mlp",),
        "mlp.fc": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.act": ("mlp.act_fn",),
        "mlp.proj": ("mlp.down_proj",),
    },
    keys=dict(SHAPE_KEYS),
    structure="llama",
    disagree=_llama_disagree,
    derived=_llama_derived,
)

FAMILIES = {f.name: f for f in (GPT2, LLAMA)}


def generic(model_type: str) -> Family:
    """A family recompute_lab has no map for: block-level strategies only, measured, no closed-form
    theory."""
    return Family(
        name=model_type,
        model_types=(model_type,),
        layers="",
        attention=None,
        parts={},
        keys=dict(SHAPE_KEYS),
    )


def family_for(model_type: str, forced: Optional[str] = None) -> Family:
    """The family of a config's ``model_type`` (``forced``: model.hf.family, e.g. llama for a
    Llama-like type)."""
    if forced is not None:
        if forced not in FAMILIES:
            raise ConfigError(
                f"model.hf.family={forced!r} is not a known family; valid: {', '.join(FAMILIES)} "
                "(or null: from the config's model_type)"
            )
        return FAMILIES[forced]
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None) or generic(
        model_type
    )

"""Saved-tensor theory for Hugging Face models whose structure recompute_lab.predict.theory knows,
term by term.

Registered with recompute_lab.predict.theory as the ``hf`` architecture (on import of
recompute_lab.model.hf), so
``theory.predict_activations`` (and the peak model, the parameter count) handle a ``model=hf``
config like
recompute_lab's own: one list of saved tensors with their storages, checkpoint regions keeping their
inputs.

The terms are recompute_lab.predict.theory's where the code agrees, and HF's own where it does not
(the differences
tests/unit/test_hf_parity.py pins, here as terms):

gpt2   recompute_lab's gpt with mlp=gelu_tanh (or gelu) and learned positions, module for module
       (c_attn is the
       fused qkv projection, SDPA gets views of it). ``gelu_new`` is the tanh approximation written
       in Python: it
       keeps tanh's output, 1 + tanh and 0.5 * x besides x, three more (b, s, d_ff) tensors per
       layer. With eager
       attention HF adds a float (b, 1, s, s) mask made once per forward (recompute_lab keeps a bool
       (s, s) mask per
       layer); a checkpoint region over a layer, its attention or its core keeps it as an input.
llama  (llama, mistral, qwen2) separate q/k/v and gate/up projections (each its own storage;
       recompute_lab's fused
       projections keep one), RoPE as q * cos + rotate_half(q) * sin with cos and sin made once per
       forward in the
       activation dtype (saved by every layer's multiplications: counted once), q and k keeping the
       projection's
       (b, s, h, d) layout, so the SDPA output needs no copy before o_proj. RMSNorm in Python on
       every device:
       x in fp32, the fp32 1/rms and the normalised x in the input dtype are kept. Eager attention
       repeats k and v
       for grouped heads, keeps fp32 softmax probabilities (and their 16-bit cast) and a contiguous
       output copy.
       A region over a layer, its attention or its core keeps cos, sin and the int64 position ids
       (and eager's
       float mask) as inputs.

No closed form (``reason``): families without a structure here, configs where the structure differs
(each family's
``disagree`` in recompute_lab.config.hf_families), bf16_autocast (autocast's casts inside HF's
Python ops, e.g. RoPE's
promotion of q by fp32 cos/sin, are not modelled), and sliding windows no longer than the sequence
(HF then passes
an explicit mask and repeats k/v for every head).

Layer: predict (no torch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
from typing import Any, Optional


from recompute_lab.config import ModelConfig
from recompute_lab.config.spec import Shape, as_model_config, config_key, from_plain
from recompute_lab.predict import theory
from recompute_lab.config.hf_families import FAMILIES, Family, head_dim
from recompute_lab.config.hf import hf_config

Saved = theory.Saved


def _key(cfg) -> str:
    """A hashable snapshot of a model config node (for the caches below)."""
    return config_key(as_model_config(cfg))


@functools.lru_cache(maxsize=64)
def _config(key: str):
    return hf_config(from_plain(ModelConfig, json.loads(key)))


def config_of(cfg) -> tuple[Any, Family]:
    """(transformers config, family) of a resolved model=hf model config (cached per config)."""
    return _config(_key(cfg))


def reason(cfg, st: Shape) -> Optional[str]:
    """Why the theory has no closed form for this model and setting (None: it has one)."""
    config, family = config_of(cfg)
    if family.structure is None or family.name not in FAMILIES:
        return (
            f"Hugging Face model_type {config.model_type!r}: no structure in "
            f"recompute_lab.predict.hf_theory "
            "(known: gpt2; llama, mistral, qwen2); measured only"
        )
    why = family.disagree(config) if family.disagree else []
    window = getattr(config, "sliding_window", None)
    if (
        family.name == "llama"
        and window
        and st.seq >= window
        and (getattr(config, "use_sliding_window", True) or config.model_type == "mistral")
    ):
        # HF skips the mask only while the sequence is shorter than the window; with a mask, SDPA
        # gets k and v
        # repeated to every head (no native GQA) and the layers a (b, 1, s, s) mask
        why.append(
            f"sliding window {window} <= seq {st.seq}: SDPA gets an explicit mask and repeated k/v"
        )
    if st.autocast_bytes is not None:
        why.append("bf16_autocast: autocast's casts inside HF's Python ops are not modelled")
    return (
        f"Hugging Face {config.model_type}: no closed form ({'; '.join(why)}); measured only"
        if why
        else None
    )


def flops_reason(cfg) -> Optional[str]:
    """Why recompute_lab.measure.flops' formula does not apply (None: it does, part for part). Its
    matmul FLOPs are HF's
    (separate q/k/v or gate/up projections multiply as the fused ones do); its recompute terms
    assume dropout
    where recompute_lab puts it, which Llama-style attention_dropout is not."""
    config, family = config_of(cfg)
    if family.structure is None or family.name not in FAMILIES:
        return (
            f"Hugging Face model_type {config.model_type!r}: no FLOP formula (counted with "
            "FlopCounterMode only)"
        )
    if family.structure == "llama" and getattr(config, "attention_dropout", 0.0):
        return (
            "Hugging Face llama-style attention_dropout: its recompute differs from the formula's "
            "dropout"
        )
    return None


def canonical(cfg, rel: str) -> Optional[str]:
    """The part (attn, attn.core, mlp, norm1...) a module name relative to a layer plays, or
    None."""
    return config_of(cfg)[1].canonical(rel)


# --- gpt2: recompute_lab's gpt terms, HF's module names, gelu_new's extra tensors
# -----------------------------


def _gpt2_rename(family: Family) -> dict[str, str]:
    names = {
        "tok_emb": "hf.transformer.wte",
        "pos_emb": "hf.transformer.wpe",
        "drop": "hf.transformer.drop",
        "norm_f": "hf.transformer.ln_f",
        "head": "hf.lm_head",
        "attn.drop": "attn.resid_dropout",
        "mlp.drop": "mlp.dropout",
    }
    names.update({part: mods[0] for part, mods in family.parts.items() if len(mods) == 1})
    return names


def _rename(module: str, names: dict[str, str]) -> str:
    m = re.match(r"(blocks\.\d+)\.(.+)", module)
    if m:
        return f"{m.group(1)}.{names.get(m.group(2), m.group(2))}"
    return names.get(module, module)


def gpt2_terms(cfg, st: Shape, config, family: Family) -> list[Saved]:
    names = _gpt2_rename(family)
    n, c, f = st.batch * st.seq, st.compute_bytes, cfg.d_ff
    out = []
    for t in theory.saved_terms(cfg, st):
        if (
            t.op == "masked_fill"
        ):  # recompute_lab's per-layer bool causal mask: HF adds a float mask instead
            continue
        out.append(dataclasses.replace(t, module=_rename(t.module, names)))
        if t.op == "gelu" and config.activation_function == "gelu_new":
            p = t.module.rsplit(".mlp.act", 1)[0]
            for what in ("tanh", "1 + tanh", "0.5 * x"):
                out.append(
                    Saved(
                        f"{p}.mlp.act",
                        "gelu_new",
                        f"{p}.mlp.act:{what}",
                        n * f * c,
                        f"gelu_new in Python keeps {what} (b, s, d_ff)",
                    )
                )
    return out


# --- llama (llama, mistral, qwen2)
# ----------------------------------------------------------------------------


def llama_terms(cfg, st: Shape, config, family: Family) -> list[Saved]:
    b, s, h, v, f = st.batch, st.seq, cfg.d_model, cfg.vocab_size, cfg.d_ff
    n, r, c = b * s, st.param_bytes, st.compute_bytes
    a, kv, hd = cfg.n_head, cfg.n_kv_head or cfg.n_head, head_dim(config)
    out: list[Saved] = []

    def add(module, op, storage, nbytes, why, pv=False):
        out.append(Saved(module, op, storage, int(nbytes), why, pv))

    def linear(module, in_storage, fan_in, in_dt, bias=False):
        add(
            module,
            "addmm" if bias else "mm",
            in_storage,
            n * fan_in * in_dt,
            "input, for the weight gradient",
        )
        return f"{module}:out"

    def rmsnorm(module, x):
        """LlamaRMSNorm: weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype), x32 = x.float()."""
        add(
            module,
            "pow/mul",
            x if r == 4 else f"{module}:x_fp32",
            n * h * 4,
            "input x" if r == 4 else "fp32 upcast of the 16-bit input",
        )
        add(module, "rsqrt/mul", f"{module}:rstd", n * 4, "fp32 per-token 1/rms")
        add(
            module,
            "mul",
            f"{module}:normed",
            n * h * r,
            "normalised x in the input dtype, for the weight gradient",
        )
        return f"{module}:out"

    add("hf.model.embed_tokens", "embedding", "input:idx", n * 8, "int64 token ids")
    x = "emb:out"
    qkv_bias = bool(cfg.bias)
    backend = "eager" if cfg.attention == "eager" else theory.sdpa_backend(cfg, st)
    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        attn, core = f"{p}.self_attn", f"{p}.self_attn.core"
        x1 = rmsnorm(f"{p}.input_layernorm", x)
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(f"{attn}.{proj}", x1, h, r, qkv_bias)
        for tab in ("cos", "sin"):  # once per forward, shared by every layer (one storage)
            add(
                attn,
                "mul",
                f"rope:{tab}",
                s * hd * r,
                f"RoPE {tab} (1, s, head_dim) in the activation dtype",
            )
        q, k, vv = (
            f"{attn}:q_rope",
            f"{attn}:k_rope",
            f"{attn}.v_proj:out",
        )  # fused kernels keep these
        if backend in ("cpu_flash", "flash", "efficient"):
            for name, stor, heads in (("q", q, a), ("k", k, kv), ("v", vv, kv)):
                add(
                    core, f"sdpa_{backend}", stor, n * heads * hd * c, f"{name} (input; GQA native)"
                )
            add(
                core,
                f"sdpa_{backend}",
                f"{core}:out",
                n * a * hd * c,
                "attention output ((b, s, h, d) layout)",
            )
            lse_s = math.ceil(s / 32) * 32 if backend == "efficient" else s
            add(
                core,
                f"sdpa_{backend}",
                f"{core}:lse",
                b * a * lse_s * 4,
                "fp32 log-sum-exp per row",
            )
            y = f"{core}:out"  # transpose(1, 2).contiguous() of a (b, s, h, d) layout: no copy
        elif backend == "eager":
            sq = b * a * s * s
            for name in ("q", "k", "v"):
                add(
                    core,
                    "bmm",
                    f"{core}:{name}_copy",
                    n * a * hd * c,
                    f"{name} as a contiguous bmm operand"
                    + (" (repeated to all heads)" if name != "q" and kv != a else ""),
                    pv=name == "v",
                )
            add(core, "_softmax", f"{core}:probs", sq * 4, "fp32 softmax probabilities (s^2)")
            if c != 4:
                add(
                    core,
                    "bmm",
                    f"{core}:probs_cast",
                    sq * c,
                    "probabilities cast to the activation dtype (s^2)",
                    pv=True,
                )
            y = f"{core}:out_copy"
            add(
                attn + ".o_proj",
                "mm",
                y,
                n * a * hd * c,
                "contiguous (b, s, h*d) copy of the attention output",
            )
        # the decomposed math path (CPU with dropout): family.disagree refuses attention_dropout > 0
        else:
            raise ValueError(f"no Hugging Face llama terms for SDPA backend {backend!r}")
        if backend != "eager":
            linear(f"{attn}.o_proj", y, a * hd, c)
        mid = f"{p}:mid"
        x2 = rmsnorm(f"{p}.post_attention_layernorm", mid)
        linear(f"{p}.mlp.gate_proj", x2, h, r)
        linear(f"{p}.mlp.up_proj", x2, h, r)
        add(
            f"{p}.mlp.act_fn",
            "silu",
            f"{p}.mlp.gate_proj:out",
            n * f * c,
            "silu input (gate projection)",
        )
        add(
            f"{p}.mlp",
            "mul",
            f"{p}.mlp.act_fn:out",
            n * f * c,
            "silu(gate), for the up branch's gradient",
        )
        add(
            f"{p}.mlp",
            "mul",
            f"{p}.mlp.up_proj:out",
            n * f * c,
            "up projection, for the gate branch's gradient",
        )
        linear(f"{p}.mlp.down_proj", f"{p}.mlp:prod", f, c)
        x = f"{p}:out"
    xf = rmsnorm("hf.model.norm", x)
    linear("hf.lm_head", xf, h, r)
    add(
        "loss",
        "_log_softmax",
        "loss:logp",
        n * v * 4,
        "fp32 log-probabilities, the cross-entropy input (4sbv)",
    )
    add("loss", "nll_loss", "input:targets", n * 8, "int64 targets")
    add("loss", "nll_loss", "loss:total_weight", 4, "fp32 scalar")
    return out


def saved_terms(cfg, st: Shape) -> list[Saved]:
    config, family = config_of(cfg)
    return (gpt2_terms if family.structure == "gpt2" else llama_terms)(cfg, st, config, family)


# --- checkpoint regions
# ---------------------------------------------------------------------------------------

REGION = re.compile(r"blocks\.(\d+)(?:-(\d+))?(?:\.(.+))?")


def region_inputs(cfg, st: Shape, name: str) -> Optional[list[tuple[str, int]]]:
    """(storage, bytes) a checkpoint region over ``name`` keeps (HF module names: blocks.i,
    blocks.i-j,
    blocks.i.<module>), the arguments HF passes besides the hidden state included; None if
    unknown."""
    config, family = config_of(cfg)
    m = REGION.fullmatch(name)
    if (
        not m
        or max(int(m.group(1)), int(m.group(2) or 0)) >= cfg.n_layer
        or (m.group(2) and m.group(3))
    ):
        return None
    part = family.canonical(m.group(3)) if m.group(3) else None
    if m.group(3) and part is None:
        return None
    b, s, n, r, c = st.batch, st.seq, st.batch * st.seq, st.param_bytes, st.compute_bytes
    i, p = int(m.group(1)), f"blocks.{m.group(1)}"
    # Arguments of the layer call: the eager float mask, RoPE's cos/sin and the position ids (a
    # layer passes them
    # on to its attention, the attention to its core).
    extra = [("hf:mask", b * s * s * r)] if cfg.attention == "eager" else []
    if family.structure == "gpt2":
        extra.append(("pos_emb:positions", s * 8))  # the int64 position ids wpe saves too
    else:
        hd = head_dim(config)
        extra += [("rope:cos", s * hd * r), ("rope:sin", s * hd * r), ("hf:position_ids", s * 8)]
    if family.structure == "gpt2":
        inputs = theory.region_inputs(cfg, st, f"{p}.{part}" if part else name)
        if inputs is None:
            return None
        return inputs + (extra if part in (None, "attn", "attn.core") else [])
    x = f"blocks.{i - 1}:out" if i else "emb:out"
    kv, hd = cfg.n_kv_head or cfg.n_head, head_dim(config)
    if part in (None, "norm1"):
        return [(x, n * cfg.d_model * r)] + (extra if part is None else [])
    if part == "norm2":
        return [(f"{p}:mid", n * cfg.d_model * r)]
    if part == "attn":
        return [(f"{p}.input_layernorm:out", n * cfg.d_model * r)] + extra
    if part == "mlp":
        return [(f"{p}.post_attention_layernorm:out", n * cfg.d_model * r)]
    if part == "mlp.act":
        return [(f"{p}.mlp.gate_proj:out", n * cfg.d_ff * c)]
    if part == "attn.core":
        attn = f"{p}.self_attn"
        return [
            (f"{attn}:q_rope", n * cfg.n_head * hd * c),
            (f"{attn}:k_rope", n * kv * hd * c),
            (f"{attn}.v_proj:out", n * kv * hd * c),
        ] + extra
    return None


# --- shapes: parameters and buffers, from the model built on the meta device
# ----------------------------------

# Builds a Hugging Face model on the meta device from a model config: set by recompute_lab.model.hf
# on import
# (this layer imports no torch or transformers; parameter shapes of an HF model come from building
# it).
META_BUILDER: Optional[Any] = None


@functools.lru_cache(maxsize=32)
def _meta_layout(key: str, n_layer: int) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    if META_BUILDER is None:
        raise RuntimeError(
            "a Hugging Face model's parameter shapes need recompute_lab.model.hf (import it first)"
        )
    mcfg = dataclasses.replace(from_plain(ModelConfig, json.loads(key)), n_layer=n_layer)
    model = META_BUILDER(mcfg, "meta")
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    return params, sum(t.numel() * t.element_size() for t in model.buffers())


def param_tensors(cfg, n_layer: Optional[int] = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter in ``model.parameters()`` order (tied weights once), from a
    one-layer
    build on the meta device: the layers' parameters repeat, named blocks.i."""
    params, _ = _meta_layout(_key(cfg), 1)
    rest = [(nm, sh) for nm, sh in params if not nm.startswith("blocks.")]
    block = [(nm[len("blocks.0.") :], sh) for nm, sh in params if nm.startswith("blocks.0.")]
    layers = cfg.n_layer if n_layer is None else n_layer
    return rest + [(f"blocks.{i}.{nm}", sh) for i in range(layers) for nm, sh in block]


def param_count(cfg) -> int:
    """Parameters (tied weights once) without listing the layers: O(1) in n_layer, so absurd sizes
    are refused
    at once (recompute_lab.measure.probe.guard_memory)."""
    one = param_tensors(cfg, n_layer=1)
    block = sum(math.prod(sh) for nm, sh in one if nm.startswith("blocks."))
    return (
        sum(math.prod(sh) for nm, sh in one if not nm.startswith("blocks.")) + cfg.n_layer * block
    )


def buffer_bytes(cfg) -> int:
    """The model's buffers (RoPE's inverse frequencies...): a one-layer build's, plus any per-layer
    ones."""
    _, one = _meta_layout(_key(cfg), 1)
    _, two = _meta_layout(_key(cfg), 2)
    return one + (cfg.n_layer - 1) * (two - one)


theory.ARCHS["hf"] = sys.modules[
    __name__
]  # recompute_lab.predict.theory asks this module for model=hf configs

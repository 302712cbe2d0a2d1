"""Analytic memory formulas, imported wherever a prediction is set beside a measurement.

Model state per parameter (Ultra-Scale Playbook, "Memory usage in Transformers"):
  fp32 training with Adam:           4 (params) + 4 (grads) + 8 (Adam m, v)                = 16 B
  bf16 with fp32 master weights:     2 (params) + 2 (grads) + 4 (master) + 8 (fp32 Adam)   = 16 B
  ... plus fp32 gradient accumulation buffers:                              + 4             = 20 B
The seed notebook's 12 B for fp32 forgets the gradients.

Activations (bytes saved for backward by one forward) are derived op by op for the model as built in
recompute_lab.model.gpt: :func:`saved_terms` lists every tensor autograd keeps, named after the
module that saves it
and the aten op whose backward needs it, with the storage it lives in (views share one) and the
assumption it
carries. :func:`predict_activations` applies a strategy plan (a checkpointed module keeps only its
inputs) and
de-duplicates by storage, exactly as the measurement in recompute_lab.measure.memory counts. For
comparison:
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1)
give
sbh(34 + 5as/h) bytes per layer for 16-bit training with dropout, and the seed notebook guessed 2 B
x 2 x h per
token per layer. The fp32 cross-entropy input (4sbv) is reported apart as ``logits``.

Layer: predict (no torch).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from dataclasses import asdict, dataclass
from typing import Optional

from recompute_lab.config.spec import Shape

# Bytes per parameter by kind, for each precision policy name.
MODEL_STATE_BYTES_PER_PARAM: dict[str, dict[str, int]] = {
    "fp32": {"params": 4, "grads": 4, "master": 0, "optimizer": 8},
    "bf16_autocast": {"params": 4, "grads": 4, "master": 0, "optimizer": 8},
    "bf16_master": {"params": 2, "grads": 2, "master": 4, "optimizer": 8},
    "bf16_master+fp32_grad_accum": {"params": 2, "grads": 6, "master": 4, "optimizer": 8},
}


def model_state_key(precision: str, fp32_grad_accum: bool = False) -> str:
    return (
        f"{precision}+fp32_grad_accum"
        if fp32_grad_accum and precision == "bf16_master"
        else precision
    )


def model_state_bytes(n_params: int, precision: str, fp32_grad_accum: bool = False) -> dict:
    """Predicted model-state bytes for ``n_params`` parameters: per kind, total and bytes per
    parameter."""
    per = MODEL_STATE_BYTES_PER_PARAM[model_state_key(precision, fp32_grad_accum)]
    by_kind = {k: v * n_params for k, v in per.items()}
    return {
        "per_param": by_kind,
        "total": sum(by_kind.values()),
        "bytes_per_param": sum(per.values()),
    }


# Architectures described outside this module: arch name -> a module with saved_terms(cfg, st),
# region_inputs(cfg, st, name), reason(cfg, st) (why no closed form, or None), param_tensors(cfg,
# n_layer),
# param_count(cfg) and buffer_bytes(cfg). recompute_lab.model.hf registers "hf" when imported.
ARCHS: dict = {}


def external(cfg):
    """The module describing ``cfg``'s architecture when it is not recompute_lab.model.gpt's own
    (else None)."""
    arch = str(cfg.arch)
    if arch in ("gpt", "toy_mlp"):
        return None
    if (
        arch not in ARCHS
    ):  # recompute_lab.predict.hf_theory registers "hf" (recompute_lab.model imports it)
        raise ValueError(
            f"model.arch={arch}: no theory registered (import recompute_lab.model first)"
        )
    return ARCHS[arch]


def param_count(cfg) -> int:
    """Parameters of recompute_lab.model.gpt's GPT (or toy MLP) for model config ``cfg``, counted
    from the shapes
    alone (tied weights once), so that absurd sizes are refused before anything is built."""
    if external(cfg) is not None:  # a Hugging Face model: from a one-layer build on the meta device
        return external(cfg).param_count(cfg)
    h, v = cfg.d_model, cfg.vocab_size
    bias = 1 if cfg.bias else 0

    def linear(fan_in: int, fan_out: int) -> int:
        return fan_in * fan_out + bias * fan_out

    norm = h * (
        1 + (bias if cfg.norm == "layernorm" else 0)
    )  # LayerNorm: weight (+ bias); RMSNorm: weight
    if cfg.arch == "toy_mlp":
        block, final_norm = 2 * linear(h, h), 0
    else:
        hd = h // cfg.n_head
        qkv = linear(h, (cfg.n_head + 2 * (cfg.n_kv_head or cfg.n_head)) * hd)
        fc = linear(h, (2 if cfg.mlp == "swiglu" else 1) * cfg.d_ff)
        block, final_norm = 2 * norm + qkv + linear(h, h) + fc + linear(cfg.d_ff, h), norm
    positions = cfg.max_seq_len * h if cfg.positions == "learned" and cfg.arch != "toy_mlp" else 0
    head = 0 if cfg.tie_embeddings else h * v
    return v * h + positions + cfg.n_layer * block + final_norm + head


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int) -> int:
    """Korthikanti et al. 2022: one transformer layer, 16-bit, dropout on, no recomputation: sbh(34
    + 5as/h)."""
    return s * b * h * 34 + 5 * a * s * s * b


def naive_layer_bytes(s: int, b: int, h: int) -> int:
    """The seed notebook's guess: 2 bytes x 2 x hidden per token per layer (it calls it Q/K/V)."""
    return 2 * 2 * h * s * b


@dataclass(frozen=True)
class Saved:
    """One tensor autograd keeps for backward."""

    # qualified name of the module whose forward saves it ("loss": GPT.forward's cross-entropy)
    module: str
    op: str  # the aten op whose backward needs it
    storage: str  # storage identity: terms with one storage count once
    nbytes: int
    why: str  # the assumption behind the size / dtype
    # an operand of eager attention's att @ v, needed only by the first backward step of the core:
    # freed before the s^2 score gradients exist (recompute_lab.predict.peak's attention moment)
    pv: bool = False


def sdpa_backend(cfg, st: Shape) -> str:
    """Which SDPA kernel F.scaled_dot_product_attention picks (torch 2.13): cpu_flash | math | flash
    | efficient."""
    if st.device == "cuda":
        # Flash needs 16-bit inputs; fp32 goes to the memory-efficient kernel. Both support dropout
        # and GQA.
        return "flash" if st.compute_bytes == 2 else "efficient"
    # CPU: the flash kernel has no dropout, so dropout > 0 falls back to the decomposed math path.
    return "cpu_flash" if cfg.dropout == 0 else "math"


def saved_terms(cfg, st: Shape) -> list[Saved]:
    """Every tensor saved for backward by one training forward with nothing recomputed, in forward
    order."""
    b, s, h, v = st.batch, st.seq, cfg.d_model, cfg.vocab_size
    n = b * s  # tokens
    r, c, auto = st.param_bytes, st.compute_bytes, st.autocast_bytes is not None
    cuda = st.device == "cuda"
    # native_dropout's mask: bool on CUDA, the input's dtype on CPU (CPU draws it with bernoulli_
    # into empty_like).

    def mask_b(dt: int) -> int:
        return 1 if cuda else dt

    drop = cfg.dropout > 0
    out: list[Saved] = []

    def add(module, op, storage, nbytes, why, pv=False):
        out.append(Saved(module, op, storage, int(nbytes), why, pv))

    def dropout(module, width, dt):
        if drop:
            add(
                module,
                "native_dropout",
                f"{module}:mask",
                n * width * mask_b(dt),
                f"dropout mask, {'bool' if cuda else 'input dtype'} on {st.device}",
            )

    def linear(module, in_storage, in_dt, fan_in, fan_out):
        """nn.Linear saves its input (and its weight, a parameter: not counted); returns the output
        storage."""
        op = "addmm" if cfg.bias and module != "head" else "mm"  # a biased Linear dispatches addmm
        if auto and in_dt == 4:  # autocast casts an fp32 input to bf16 and saves the cast copy
            add(
                module,
                op,
                f"{module}:in_bf16",
                n * fan_in * 2,
                "autocast bf16 copy of the fp32 input",
            )
        else:
            add(module, op, in_storage, n * fan_in * in_dt, "input, for the weight gradient")
        if auto:  # the cached bf16 copy of the weight is saved for the input gradient
            add(
                module,
                op,
                f"{module}:w_bf16",
                fan_in * fan_out * 2,
                "autocast bf16 copy of the weight",
            )
        return f"{module}:out"

    def norm(module, in_storage):
        """LayerNorm / RMSNorm on the residual stream (dtype r). Returns the output storage."""
        if cfg.norm == "layernorm":
            add(module, "native_layer_norm", in_storage, n * h * r, "input x")
            stat = (
                4 if cuda or r == 4 else r
            )  # CPU keeps mean/rstd in the input dtype, CUDA in fp32
            add(module, "native_layer_norm", f"{module}:mean", n * stat, "per-token mean")
            add(module, "native_layer_norm", f"{module}:rstd", n * stat, "per-token 1/std")
        elif cuda:
            add(
                module,
                "_fused_rms_norm",
                in_storage,
                n * h * r,
                "input x (fused CUDA kernel, PyTorch source)",
            )
            add(module, "_fused_rms_norm", f"{module}:rstd", n * 4, "fp32 per-token 1/rms")
        # CPU decomposes rms_norm in fp32: x32 = x.float(); x32 * rsqrt(mean(x32^2) + eps) * weight
        else:
            if r == 4:
                add(module, "pow/mul", in_storage, n * h * 4, "input x (decomposed rms_norm)")
            else:
                add(
                    module,
                    "pow/mul",
                    f"{module}:x_fp32",
                    n * h * 4,
                    "fp32 upcast of the 16-bit input",
                )
            add(module, "mul", f"{module}:rstd", n * 4, "fp32 per-token rsqrt(mean(x^2) + eps)")
            add(
                module,
                "mul",
                f"{module}:normed",
                n * h * 4,
                "fp32 x * rstd, for the weight gradient",
            )
        return f"{module}:out"

    # Embeddings: the lookup keeps its integer indices.
    add("tok_emb", "embedding", "input:idx", n * 8, "int64 token ids")
    toy = cfg.arch == "toy_mlp"
    if cfg.positions == "learned" and not toy:
        add("pos_emb", "embedding", "pos_emb:positions", s * 8, "int64 positions (arange)")
    dropout("drop", h, r)
    x = "drop:out" if drop else "emb:out"

    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        if toy:  # linear2(relu(linear1(x))): relu keeps its output, linear2 saves the same tensor
            linear(
                f"{p}.linear1", x, r if i == 0 else c, h, h
            )  # later blocks take linear2's output
            add(f"{p}.relu", "relu", f"{p}.relu:out", n * h * c, "relu output (threshold_backward)")
            linear(f"{p}.linear2", f"{p}.relu:out", c, h, h)
            x = f"{p}:out"
            continue
        x = _attention_terms(cfg, st, p, x, add, linear, norm, dropout)
        # MLP half: x + drop(proj(act(fc(norm2(x)))))
        n2 = norm(f"{p}.norm2", x)
        fc = linear(f"{p}.mlp.fc", n2, r, h, (2 if cfg.mlp == "swiglu" else 1) * cfg.d_ff)
        f = cfg.d_ff
        if cfg.mlp == "swiglu":  # silu(a) * g on the two halves (views) of the fc output
            add(
                f"{p}.mlp.act",
                "silu",
                fc,
                n * 2 * f * c,
                "fc output (silu's input a and the gate g are views)",
            )
            add(
                f"{p}.mlp.act",
                "mul",
                f"{p}.mlp.act:silu",
                n * f * c,
                "silu(a), for the gate's gradient",
            )
        # exact or tanh-approximated (gelu_tanh): one aten.gelu kernel either way, keeping its input
        # only
        else:
            tanh = ", tanh approximation" if cfg.mlp == "gelu_tanh" else ""
            add(f"{p}.mlp.act", "gelu", fc, n * f * c, f"gelu input (fc output){tanh}")
        linear(f"{p}.mlp.proj", f"{p}.mlp.act:out", c, f, h)
        dropout(f"{p}.mlp.drop", h, c)
        x = f"{p}:out"

    if not toy:
        x = norm("norm_f", x)
    linear("head", x, r, h, v)
    # Cross-entropy on fp32 logits: log_softmax keeps its fp32 output (4sbv); nll_loss keeps targets
    # + weight sum.
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


def _attention_terms(cfg, st: Shape, p: str, x: str, add, linear, norm, dropout) -> str:
    """x + drop(out(core(rope(q), rope(k), v))) of block ``p``; returns the storage of its
    output."""
    b, s, h, a = st.batch, st.seq, cfg.d_model, cfg.n_head
    n, r, c = b * s, st.param_bytes, st.compute_bytes
    kv = cfg.n_kv_head or a
    hd = h // a
    qkv = linear(f"{p}.attn.qkv", norm(f"{p}.norm1", x), r, h, (a + 2 * kv) * hd)
    q, k, vv = qkv, qkv, qkv  # q, k, v are strided views of the fused qkv output
    if cfg.positions == "rope":
        for name in ("q", "k"):
            if (
                c != 4
            ):  # the fp32 cos/sin tables are cast to the activation dtype per call and saved by mul
                for tab in ("cos", "sin"):
                    add(
                        f"{p}.attn.rotary",
                        "mul",
                        f"{p}.attn.rotary:{name}_{tab}",
                        s * hd // 2 * c,
                        f"{tab} table cast to the activation dtype",
                    )
        q, k = (
            f"{p}.attn.rotary:q",
            f"{p}.attn.rotary:k",
        )  # stack() outputs, contiguous (b, h, s, hd)
    core, sq = f"{p}.attn.core", b * a * s * s
    backend = "eager" if cfg.attention == "eager" else sdpa_backend(cfg, st)
    y_copy = True  # is the out-projection's input a contiguous copy of the core output?
    if backend in ("cpu_flash", "flash", "efficient"):
        # The fused kernel keeps q, k, v as passed (k, v with n_kv heads: GQA is native), its output
        # and the
        # fp32 log-sum-exp (efficient pads s to a multiple of 32); with dropout on CUDA, the philox
        # seed/offset.
        for name, stor, heads in (("q", q, a), ("k", k, kv), ("v", vv, kv)):
            add(
                core,
                f"sdpa_{backend}",
                stor,
                (n * (a + 2 * kv) * hd if stor == qkv else n * heads * hd) * c,
                f"{name} (input)" + (", a view of the fused qkv output" if stor == qkv else ""),
            )
        add(core, f"sdpa_{backend}", f"{core}:out", n * h * c, "attention output")
        lse_s = math.ceil(s / 32) * 32 if backend == "efficient" else s
        add(core, f"sdpa_{backend}", f"{core}:lse", b * a * lse_s * 4, "fp32 log-sum-exp per row")
        if backend != "cpu_flash" and cfg.dropout > 0:
            add(
                core,
                f"sdpa_{backend}",
                f"{core}:rng",
                24 if backend == "flash" else 16,
                "philox seed + offset",
            )
        # Output layout: (b, s, h, d) when q is a strided view (flash follows q's layout) or always
        # (efficient):
        # then the rearrange before the out-projection is a view and nothing new is saved.
        y_copy = backend != "efficient" and q != qkv
    elif backend == "math":
        # Decomposed SDPA (CPU with dropout): 16-bit inputs upcast to fp32; scaled q, k and v kept
        # as
        # contiguous (b*a, s, hd) copies (k, v repeated to a heads under GQA), the s^2
        # probabilities, the
        # dropout mask (fp32 on CPU) and the dropped probabilities.
        for name in ("q", "k", "v"):
            add(
                core,
                "bmm",
                f"{core}:{name}_fp32",
                n * h * 4,
                f"contiguous fp32 {name} for the batched matmul",
                pv=name == "v",
            )
        add(core, "_safe_softmax", f"{core}:probs", sq * 4, "fp32 softmax probabilities (s^2)")
        if cfg.dropout > 0:
            add(core, "native_dropout", f"{core}:mask", sq * 4, "fp32 dropout mask (s^2, CPU)")
            add(
                core, "bmm", f"{core}:dropped", sq * 4, "fp32 dropped probabilities (s^2)", pv=True
            )
    else:
        # Eager: q @ k^T saves q and k as (b*a, s, hd) operands: a contiguous copy of a strided
        # qkv view, the rope output itself, or the GQA-repeated copy; att @ v likewise saves v.
        # With one sequence (b = 1) or one head, matmul folds a (b, a, s, hd) view of qkv into its
        # 3-d operand without copying (a size-1 dim merges with any stride): the view is saved, and
        # with it the whole qkv output (with RoPE only v's view holds it: three times v's bytes).
        folds = b == 1 or a == 1
        for name, stor in (("q", q), ("k", k), ("v", vv)):
            repeated = name != "q" and kv != a
            if stor == qkv and folds and not repeated:
                add(
                    core,
                    "bmm",
                    qkv,
                    n * (a + 2 * kv) * hd * c,
                    f"{name}: a view of the qkv output",
                    pv=name == "v",
                )
                continue
            kept = f"{core}:{name}_copy" if stor == qkv or repeated else stor
            add(
                core,
                "bmm",
                kept,
                n * h * c,
                f"{name} as a contiguous bmm operand"
                + (" (repeated to all heads)" if repeated else ""),
                pv=name == "v",
            )
        add(core, "masked_fill", f"{core}:causal", s * s, "bool (s, s) mask ~causal, made per call")
        cuda_auto = st.device == "cuda" and st.autocast_bytes is not None
        pb = 4 if cuda_auto else c  # CUDA autocast runs softmax in fp32
        add(core, "_softmax", f"{core}:probs", sq * pb, "softmax probabilities (s^2)")
        if cfg.dropout > 0:
            add(
                core,
                "native_dropout",
                f"{core}:mask",
                sq * (1 if st.device == "cuda" else pb),
                "attention dropout mask (s^2)",
            )
        if cfg.dropout > 0 or cuda_auto:
            add(
                core,
                "bmm",
                f"{core}:dropped",
                sq * c,
                "probabilities as the att @ v operand (s^2)",
                pv=True,
            )
    y = f"{p}.attn.out:in_copy" if y_copy else f"{core}:out"
    linear(f"{p}.attn.out", y, c, h, h)
    dropout(f"{p}.attn.drop", h, c)
    return f"{p}:mid"


REGION = re.compile(
    r"blocks\.(\d+)(?:-(\d+))?(\.attn\.core|\.attn|\.mlp\.act|\.mlp|\.norm1|\.norm2)?"
)


def region_inputs(cfg, st: Shape, name: str) -> Optional[list[tuple[str, int]]]:
    """(storage, bytes) of what a checkpoint region over ``name`` keeps: its forward inputs; None if
    unknown.

    ``name``: blocks.i, a run of blocks blocks.i-j (one region, keeps block i's input), or blocks.i.
    + attn,
    attn.core, mlp, mlp.act, norm1, norm2.
    """
    b, s, h = st.batch, st.seq, cfg.d_model
    n, r, c = b * s, st.param_bytes, st.compute_bytes
    m = REGION.fullmatch(name)
    if not m or max(int(m.group(1)), int(m.group(2) or 0)) >= cfg.n_layer:
        return None
    i, part = int(m.group(1)), m.group(3)
    if (m.group(2) and part) or (cfg.arch == "toy_mlp" and part):
        return None
    p = f"blocks.{i}"
    if part in (
        None,
        ".norm1",
    ):  # the block input: previous block's output (toy: linear2's, dtype c)
        width = c if cfg.arch == "toy_mlp" and i else r
        return [
            (
                f"blocks.{i - 1}:out" if i else ("drop:out" if cfg.dropout > 0 else "emb:out"),
                n * h * width,
            )
        ]
    if part == ".norm2":
        return [(f"{p}:mid", n * h * r)]
    if part in (".attn", ".mlp"):
        return [(f"{p}.{'norm1' if part == '.attn' else 'norm2'}:out", n * h * r)]
    if part == ".mlp.act":
        return [(f"{p}.mlp.fc:out", n * (2 if cfg.mlp == "swiglu" else 1) * cfg.d_ff * c)]
    a, kv = cfg.n_head, cfg.n_kv_head or cfg.n_head
    hd = h // a
    qkv = (f"{p}.attn.qkv:out", n * (a + 2 * kv) * hd * c)
    if cfg.positions == "rope":
        return [
            (f"{p}.attn.rotary:q", n * a * hd * c),
            (f"{p}.attn.rotary:k", n * kv * hd * c),
            qkv,
        ]
    return [qkv]


RUN = re.compile(r"blocks\.(\d+)-(\d+)")  # a run of whole blocks, one checkpoint region
BLOCK = re.compile(r"blocks\.(\d+)(?:\.|$)")  # the block a module is in


def covers(region: str, module: str) -> bool:
    """Is ``module`` (a saving module's name) inside checkpoint region ``region``?"""
    run = RUN.fullmatch(region)
    if run:
        blk = BLOCK.match(module)
        return bool(blk) and int(run.group(1)) <= int(blk.group(1)) <= int(run.group(2))
    return module == region or module.startswith(region + ".")


class RegionIndex:
    """The checkpoint regions that cover a module, as :func:`covers` decides, found through the
    module's dotted prefixes and its block's runs: a few dict lookups per module instead of one
    regex match per region (issue 29: that made a prediction quadratic in depth, 1.1 s for
    Llama-3 405B). ``covering`` lists positions in ``regions``, ascending."""

    def __init__(self, regions: list[str]):
        self.regions = regions
        self.named: dict[str, list[int]] = {}  # region name -> its positions
        self.runs: dict[int, list[int]] = {}  # block index -> positions of the runs over it
        for k, name in enumerate(regions):
            run = RUN.fullmatch(name)
            if run:
                for i in range(int(run.group(1)), int(run.group(2)) + 1):
                    self.runs.setdefault(i, []).append(k)
            else:
                self.named.setdefault(name, []).append(k)
        self.memo: dict[str, list[int]] = {}

    def covering(self, module: str) -> list[int]:
        found = self.memo.get(module)
        if found is None:
            parts = module.split(".")
            found = [
                k for j in range(len(parts)) for k in self.named.get(".".join(parts[: j + 1]), ())
            ]
            blk = BLOCK.match(module)
            if blk:
                found += self.runs.get(int(blk.group(1)), ())
            found = self.memo[module] = sorted(found)
        return found

    def owner(self, module: str) -> Optional[str]:
        """The first region (in plan order) that covers ``module``; None if none does."""
        found = self.covering(module)
        return self.regions[found[0]] if found else None


def region_names(plan) -> list[str]:
    """Checkpoint regions of a plan (recompute_lab.strategies.Plan): whole-block groups
    (``block_groups``, e.g.
    layers uniform, sqrt) become ``blocks.i-j`` runs, one region each; otherwise the recomputed
    module names."""
    recomputed = list(plan.recomputed)
    groups = plan.block_groups
    if groups and recomputed and all(re.fullmatch(r"blocks\.\d+", n) for n in recomputed):
        return [f"blocks.{g[0]}" if len(g) == 1 else f"blocks.{g[0]}-{g[-1]}" for g in groups]
    return recomputed


def predict_activations(cfg, st: Shape, plan=None, source=None) -> dict:
    """Saved-for-backward bytes of one forward under ``plan``; ``total`` None with a ``reason`` when
    not predictable.

    ``plan`` is a recompute_lab.strategies.Plan (None: nothing recomputed). A module in
    ``plan.recomputed`` is one
    checkpoint region: its own saves disappear and its inputs are kept instead (counted once if
    something
    outside saves them anyway). A plan whose saves are decided per op, per region or elsewhere
    carries its
    ``activation_reason``: then there is no closed form.
    """
    if plan is not None and plan.activation_reason:
        return {"total": None, "reason": plan.activation_reason}
    ext = source or external(
        cfg
    )  # source: another saved-term description (a tensor-parallel rank's)
    why = ext.reason(cfg, st) if ext is not None else None
    if why:
        return {"total": None, "reason": why}
    terms = ext.saved_terms(cfg, st) if ext is not None else saved_terms(cfg, st)
    inputs_of = ext.region_inputs if ext is not None else region_inputs
    regions = region_names(plan) if plan is not None else []
    region_of: dict[str, list[Saved]] = {}
    for name in regions:
        inputs = inputs_of(cfg, st, name)
        if inputs is None:
            return {
                "total": None,
                "reason": f"no analytic model for a checkpoint region over {name!r}",
            }
        region_of[name] = [
            Saved(name, "checkpoint", stor, nb, "checkpoint region input") for stor, nb in inputs
        ]

    index = RegionIndex(regions)

    # Walk in forward order; a region's inputs are saved where the region starts (before its body),
    # and a
    # storage is billed to its first saver, as the measurement does.
    seen: dict[str, Saved] = {}
    for t in terms:
        m = index.owner(t.module)
        if m is None:
            seen.setdefault(t.storage, t)
        else:
            for k in region_of.pop(m, []):
                seen.setdefault(k.storage, k)
    by_module: dict[str, int] = {}
    for t in seen.values():
        by_module[t.module] = by_module.get(t.module, 0) + t.nbytes
    total = sum(by_module.values())
    logits = sum(t.nbytes for t in seen.values() if t.storage == "loss:logp")
    transient = max(region_transients(terms, index) + [0])
    return {
        "total": total,
        "logits": logits,
        "by_module": by_module,
        "largest_region": transient,
        "regions": regions,
        # its flat fields as a dict (asdict's deep copy cost what_fits a quarter of its time)
        "terms": [dict(t.__dict__) for t in seen.values()],
        "reason": None,
    }


def region_transients(terms: list[Saved], index: RegionIndex) -> list[int]:
    """Bytes each region re-saves while its recompute runs in backward (its own unrecomputed
    saves, each storage once at its last term's size), in the order of ``index.regions``."""
    stor: list[dict[str, int]] = [{} for _ in index.regions]
    for t in terms:
        for k in index.covering(t.module):
            stor[k][t.storage] = t.nbytes
    return [sum(d.values()) for d in stor]


CORE_OPS = ("_softmax", "_safe_softmax")  # with "sdpa_*": the ops that mark an attention core


def is_core(t: Saved) -> bool:
    return t.op in CORE_OPS or t.op.startswith("sdpa_")


def backward_moments(cfg, st: Shape, regions: list[str]) -> list[dict]:
    """The moments of backward where saved activations and temporaries pile up, under a plan whose
    checkpoint regions are ``regions`` (theory.predict_activations' ``regions``), in forward order.

    Backward runs the forward's ops in reverse, and autograd frees what an op saved once that op's
    backward has run. So at the moment backward reaches the op at forward position m, the storages
    still alive are those with a holder at a position <= m (a region's inputs count at the region's
    start, as the checkpoint keeps them until its backward ends), while everything saved after m
    is gone. Two kinds of moment:

    attention  block i's attention core computing its s^2 score gradients (eager) or its fused
               kernel's backward: m is the core's last saved term; att @ v's operands (``pv``) are
               freed already. Inside a checkpoint region the region's re-saved terms up to m are
               alive too.
    recompute  a region's forward has just been rerun: every term of the region is saved again
               (its inputs are the kept tensors themselves, not copies), m is its last term.

    Each moment: kind, module (the core or the region), index (m), alive (bytes; token ids and
    targets left out: the peak model holds the batch itself), and ``core`` (the core's terms,
    attention only). A parameter whose module first saves after m has its gradient by then.
    """
    ext = external(cfg)
    terms = ext.saved_terms(cfg, st) if ext is not None else saved_terms(cfg, st)
    inputs_of = ext.region_inputs if ext is not None else region_inputs
    index = RegionIndex(regions)
    owner = [index.owner(t.module) for t in terms]
    holders: dict[str, list[tuple[int, int, bool]]] = {}  # storage -> (position, bytes, pv)
    span: dict[str, list[int]] = {}  # region -> [first, last] position of its terms
    inputs: dict[str, set[str]] = {}
    for j, (t, r) in enumerate(zip(terms, owner)):
        if r is None:
            holders.setdefault(t.storage, []).append((j, t.nbytes, t.pv))
            continue
        if r not in span:
            span[r] = [j, j]
            kept = inputs_of(cfg, st, r) or []
            inputs[r] = {stor for stor, _ in kept}
            for stor, nb in kept:
                holders.setdefault(stor, []).append((j, nb, False))
        span[r][1] = j

    # storages by the position of their first holder, with running sums: bytes first held at or
    # before m
    firsts = sorted(
        (hs[0][0], hs[0][1]) for stor, hs in holders.items() if not stor.startswith("input:")
    )
    at = [j for j, _ in firsts]
    running = list(itertools.accumulate(nb for _, nb in firsts))

    def alive(m: int, region: Optional[str], pv_from: int) -> int:
        """Bytes alive when backward reaches position m (inside ``region``, if any), holders from
        position ``pv_from`` on that are att @ v operands already gone."""
        k = bisect.bisect_right(at, m)
        total = running[k - 1] if k else 0
        gone = {terms[j].storage for j in range(pv_from, m + 1) if terms[j].pv}
        for stor in gone & holders.keys():  # storages only this core's att @ v still held
            live = [(j, pv) for j, _, pv in holders[stor] if j <= m]
            if live and live[0][0] >= pv_from and all(pv for _, pv in live):
                total -= holders[stor][0][1]
        if region is not None:
            seen = set(inputs[region])
            for j in range(span[region][0], m + 1):
                t, outside = terms[j], holders.get(terms[j].storage)
                if owner[j] != region or t.storage in seen or (j >= pv_from and t.pv):
                    continue
                if outside is None or outside[0][0] > m:  # else already counted as alive
                    seen.add(t.storage)
                    total += t.nbytes
        return total

    out = []
    core_modules = {t.module for t in terms if is_core(t)}
    cores: dict[str, list[int]] = {}  # each core's saved terms, by forward position
    for j, t in enumerate(terms):
        if t.module in core_modules:
            cores.setdefault(t.module, []).append(j)
    for core, pos in cores.items():
        m, r = pos[-1], owner[pos[-1]]
        out.append(
            {
                "kind": "attention",
                "module": core,
                "index": m,
                "alive": alive(m, r, pos[0]),
                "core": [asdict(terms[j]) for j in pos],
            }
        )
    blocks: dict[str, list[int]] = {}  # the MLP's activation terms, per block
    for j, t in enumerate(terms):
        if is_mlp_act(t):
            blocks.setdefault(t.module.split(".mlp")[0], []).append(j)
    for block, pos in blocks.items():
        m, r = pos[-1], owner[pos[-1]]
        act = [asdict(terms[j]) for j in pos]
        out.append(
            {"kind": "mlp", "module": block, "index": m, "alive": alive(m, r, m + 1), "core": act}
        )
    for r, (_, m) in span.items():
        out.append({"kind": "recompute", "module": r, "index": m, "alive": alive(m, r, m + 1)})
    return out


MLP_ACT_OPS = ("gelu", "silu", "gelu_new")


def is_mlp_act(t: Saved) -> bool:
    """A term the MLP's activation saves (gelu / silu(a) * g): its backward is an MLP moment."""
    return t.op in MLP_ACT_OPS or (t.op == "mul" and ".mlp" in t.module)


def first_saves(cfg, st: Shape) -> dict[str, int]:
    """Module name -> forward position of its first saved term (a parameter's gradient exists once
    backward has passed that position)."""
    ext = external(cfg)
    terms = ext.saved_terms(cfg, st) if ext is not None else saved_terms(cfg, st)
    first: dict[str, int] = {}
    for j, t in enumerate(terms):
        first.setdefault(t.module, j)
    return first


def per_layer(pred: dict, i: int) -> int:
    """Bytes billed to block ``i`` (its modules and any region over it)."""
    return sum(v for k, v in pred["by_module"].items() if covers(f"blocks.{i}", k))


# FSDP with bf16_master: the sharded fp32 parameters ARE the master weights; FSDP's
# MixedPrecisionPolicy gathers
# bf16 copies for forward/backward (transient, freed after each block) and reduce-scatters gradients
# into fp32
# shards. Persistent state: fp32 params 4 + fp32 grads 4 + fp32 Adam 8 = 16 B, then divided over the
# ranks.
FSDP_BF16_MASTER_BYTES_PER_PARAM = {"params": 4, "grads": 4, "master": 0, "optimizer": 8}


def model_state_bytes_sharded(
    n_params: int,
    precision: str,
    fp32_grad_accum: bool = False,
    parallel: str = "none",
    dp_size: int = 1,
) -> dict:
    """Predicted model-state bytes held by ONE rank of a ``dp_size``-way data-parallel run.

    none / ddp: every rank holds the whole state (DDP replicates it): 16N with Adam (ZeRO stage 0).
    fsdp:       ZeRO-3 shards params, grads and optimizer state: 16N / dp_size per rank (each tensor
                is split
                along dim 0; uneven splits pad, which this formula ignores).
    ``n_params`` is the whole model's count; ``per_param`` is bytes per rank by kind.
    """
    if parallel != "fsdp":
        return model_state_bytes(n_params, precision, fp32_grad_accum)
    per = (
        FSDP_BF16_MASTER_BYTES_PER_PARAM
        if precision == "bf16_master"
        else MODEL_STATE_BYTES_PER_PARAM[model_state_key(precision, fp32_grad_accum)]
    )
    by_kind = {k: v * n_params // dp_size for k, v in per.items()}
    return {
        "per_param": by_kind,
        "total": sum(by_kind.values()),
        "bytes_per_param": sum(per.values()) / dp_size,
    }


def kernel_assumptions(target: str) -> list[str]:
    """What the estimate assumes about the target's kernels, printed with every estimate."""
    if target == "cuda":
        return [
            "SDPA: flash for 16-bit, memory-efficient for fp32; saves q, k, v, output, fp32 "
            "logsumexp "
            "(+ philox seed/offset with dropout), no s^2 scores (cuDNN attention, preferred on "
            "some Hopper "
            "builds, keeps the same set)",
            "dropout masks are bool (1 B); nn.RMSNorm runs the fused kernel (input + fp32 rstd); "
            "layernorm statistics fp32",
        ]
    return [
        "SDPA: the CPU flash kernel without dropout (q, k, v, output, fp32 logsumexp); with "
        "dropout the "
        "decomposed math path (fp32 s^2 probabilities, mask and dropped probabilities)",
        "dropout masks in the input dtype; rms_norm decomposed in fp32; 16-bit layernorm "
        "statistics 16-bit",
    ]

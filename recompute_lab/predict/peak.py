"""Peak memory of one training step (forward, backward, gradient clipping, optimizer step), phase by
phase.

Derived from the model config alone (no tensors), for one rank; recompute_lab.measure.probe sets it
beside MemTracker's
(CPU) or the CUDA allocator's peak of the same step. The step holds, besides the activations
(recompute_lab.predict.theory.predict_activations), model state (theory.model_state_bytes), the
model's buffers, AdamW's
0-d ``step`` counters, the batch (int64 token ids and targets, 16 B per token) and the loss. The
phases:

backward start   state + persistent gradient buffers + activations + loss + the head's backward
                 transient
                 (the fp32 gradients of the log-probabilities and of the logits: 2 x 4sbv)
end of backward  state + every gradient + the embedding's dense gradient (with tied embeddings the
                 head's
                 gradient and the embedding's are summed into a third buffer: 2 extra, else 1)
clip             state + gradients + what clip_grad_norm_ allocates (one fp32 norm per tensor and
                 their stack;
                 MasterWeightAdamW first upcasts every bf16 gradient: 4 B/param)
optimizer step   state + gradients + AdamW's temporaries, which depend on the implementation torch
                 picks
                 (torch/optim/adam.py, torch 2.13):
                   for-loop (CPU default)  per parameter ``denom = (exp_avg_sq.sqrt() /
                                           bc2).add_(eps)``: two
                                           tensors of its size, while the previous parameter's denom
                                           is alive
                   foreach (CUDA default)  ``_foreach_sqrt`` of the whole group's exp_avg_sq
                   fused (when asked)      none (one in-place kernel)
                 MasterWeightAdamW adds the fp32 copy of each bf16 gradient of the group it steps
                 (none with fp32_grad_accum: the fp32 buffer is stepped in place).
inside backward  (the activation theory's closed form, one rank's whole model, no FSDP) each moment
                 of backward where saved tensors and temporaries pile up, walked in reverse
                 forward order (theory.backward_moments): what is still saved there, the gradients
                 made by then, the residual gradient in flight and
                   attention_backward  an attention core's backward: eager's two s^2 score
                                       gradients, a fused kernel's q/k/v gradients
                                       (attention_temporaries)
                   mlp_backward        the MLP's activation and output projection
                                       (mlp_temporaries)
                   recompute           a checkpoint region just re-run: its re-saved tensors
recompute        (otherwise, when a region is recomputed: the budget planner's priced plans,
                 per-GPU stages, FSDP) state + activations + the largest region's re-saved
                 tensors: an upper bound, as every gradient is counted although most do not
                 exist yet (fsdp: plus the root's unsharded parameters and gradients, two blocks'
                 gathered parameters and two blocks' unsharded gradients).

Parallel layouts (per rank): ``ddp`` keeps the gradients in DDP's buckets for the whole step;
``fsdp`` holds the
padded dim-0 shards of parameters, gradients and optimizer state, the root unit's parameters
unsharded from
forward to the end of backward (FSDP2 does not reshard the root after forward) and, at backward
start, the
all-gather buffer of the last block (prefetched by the root's pre-backward).

Layer: predict (no torch).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Optional

from recompute_lab.config.spec import Shape
from recompute_lab.predict import theory

IMPLS = ("for-loop", "foreach", "fused")


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decay(self) -> bool:
        """In the weight-decay group (recompute_lab.model.precision.param_groups: matrices)."""
        return len(self.shape) >= 2


def param_tensors(cfg, n_layer: Optional[int] = None) -> list[ParamTensor]:
    """Every parameter of recompute_lab.model.gpt.GPT built from ``cfg``, in ``model.parameters()``
    order (a tied head
    weight once); ``n_layer`` overrides the config's block count (blocks are identical). Hugging
    Face models
    (recompute_lab.model.hf): their own parameters, from a one-layer build on the meta device."""
    if theory.external(cfg) is not None:
        return [
            ParamTensor(name, shape)
            for name, shape in theory.external(cfg).param_tensors(cfg, n_layer)
        ]
    h, v, toy = cfg.d_model, cfg.vocab_size, cfg.arch == "toy_mlp"
    out = [ParamTensor("tok_emb.weight", (v, h))]
    if cfg.positions == "learned" and not toy:
        out.append(ParamTensor("pos_emb.weight", (cfg.max_seq_len, h)))

    def linear(name, fan_in, fan_out):
        out.append(ParamTensor(f"{name}.weight", (fan_out, fan_in)))
        if cfg.bias:
            out.append(ParamTensor(f"{name}.bias", (fan_out,)))

    def norm(name):
        out.append(ParamTensor(f"{name}.weight", (h,)))
        if cfg.norm == "layernorm" and cfg.bias:
            out.append(ParamTensor(f"{name}.bias", (h,)))

    a, kv = cfg.n_head, cfg.n_kv_head or cfg.n_head
    for i in range(cfg.n_layer if n_layer is None else n_layer):
        p = f"blocks.{i}"
        if toy:
            linear(f"{p}.linear1", h, h)
            linear(f"{p}.linear2", h, h)
            continue
        norm(f"{p}.norm1")
        linear(f"{p}.attn.qkv", h, (a + 2 * kv) * (h // a))
        linear(f"{p}.attn.out", h, h)
        norm(f"{p}.norm2")
        linear(f"{p}.mlp.fc", h, (2 if cfg.mlp == "swiglu" else 1) * cfg.d_ff)
        linear(f"{p}.mlp.proj", cfg.d_ff, h)
    if not toy:
        norm("norm_f")
    if not cfg.tie_embeddings:
        out.append(ParamTensor("head.weight", (v, h)))
    return out


def buffer_bytes(cfg) -> int:
    """The model's buffers (never sharded): each eager AttentionCore's bool (S, S) causal mask, each
    Rotary's fp32
    cos and sin tables (S, head_dim / 2), S = max_seq_len. Hugging Face models: their own
    buffers."""
    if theory.external(cfg) is not None:
        return theory.external(cfg).buffer_bytes(cfg)
    if cfg.arch == "toy_mlp":
        return 0
    s = cfg.max_seq_len
    mask = s * s if cfg.attention == "eager" else 0
    rope = 2 * s * (cfg.d_model // cfg.n_head // 2) * 4 if cfg.positions == "rope" else 0
    return cfg.n_layer * (mask + rope)


def adam_impl(device: str, parallel: str = "none") -> str:
    """The AdamW implementation torch 2.13 picks with foreach/fused left unset (optimizer.py
    _default_to_fused_or_foreach): foreach when every parameter is a plain tensor on a foreach
    device (CUDA), else
    the for-loop. FSDP2's parameters are DTensors, not plain tensors: for-loop there too."""
    return "foreach" if device == "cuda" and parallel != "fsdp" else "for-loop"


def _loop_transient(sizes: list[int], elem: int) -> int:
    """Largest moment of the for-loop: parameter i's sqrt and quotient while i-1's denom is still
    referenced."""
    return (
        max((2 * s + (sizes[i - 1] if i else 0)) * elem for i, s in enumerate(sizes))
        if sizes
        else 0
    )


def optimizer_transient(
    groups: list[list[int]], impl: str, master_weights: bool, fp32_grad_accum: bool
) -> int:
    """Bytes AdamW allocates while stepping its largest group (groups: numel per parameter, in step
    order)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown AdamW implementation {impl!r}; valid: {', '.join(IMPLS)}")
    worst = 0
    for sizes in groups:
        adam = {"for-loop": _loop_transient(sizes, 4), "foreach": 4 * sum(sizes), "fused": 0}[impl]
        upcast = (
            4 * sum(sizes) if master_weights and not fp32_grad_accum else 0
        )  # fp32 copies of bf16 grads
        worst = max(worst, upcast + adam)
    return worst


def clip_transient(
    n_tensors: int, n_params: int, master_weights: bool, fp32_grad_accum: bool
) -> int:
    """clip_grad_norm_'s largest moment: one fp32 norm per gradient, their stack and the total
    (MasterWeightAdamW:
    after upcasting every bf16 gradient to fp32, unless they are the fp32 accumulation buffers
    already)."""
    upcast = 4 * n_params if master_weights and not fp32_grad_accum else 0
    return upcast + 8 * n_tensors + 4


def shard_rows(shape: tuple[int, ...], world_size: int) -> int:
    """Elements of one rank's padded dim-0 shard of a parameter (FSDP2 pads dim 0 to a multiple of
    the ranks)."""
    return -(-shape[0] // world_size) * math.prod(shape[1:])


def local_rows(shape: tuple[int, ...], world_size: int, rank: int) -> int:
    """Elements of rank ``rank``'s unpadded dim-0 chunk (torch.chunk's split: the last ranks may get
    fewer rows)."""
    per = -(-shape[0] // world_size)
    return max(0, min(per, shape[0] - rank * per)) * math.prod(shape[1:])


def model_state(cfg, n_params: int, step: Shape) -> dict:
    """Model-state bytes one rank holds (theory.model_state_bytes' keys). ``fsdp``: FSDP2 keeps each
    parameter's
    padded dim-0 shard and reduce-scatters gradients into padded shards, while AdamW's moments are
    made like the
    unpadded local shard; fp32 throughout (bf16_master's fp32 shards are its master weights)."""
    if step.parallel != "fsdp":
        return theory.model_state_bytes(n_params, step.precision, step.fp32_grad_accum)
    ws, rank = step.world_size, step.rank

    def total(
        rows,
    ) -> int:  # one block's tensors times n_layer, plus the rest: no loop over the layers
        params = param_tensors(cfg, n_layer=1)
        block = sum(rows(p.shape) for p in params if p.name.startswith("blocks."))
        return cfg.n_layer * block + sum(
            rows(p.shape) for p in params if not p.name.startswith("blocks.")
        )

    padded = total(lambda shape: shard_rows(shape, ws))
    local = total(lambda shape: local_rows(shape, ws, rank))
    per = {"params": 4 * padded, "grads": 4 * padded, "master": 0, "optimizer": 8 * local}
    return {
        "per_param": per,
        "total": sum(per.values()),
        "bytes_per_param": sum(per.values()) / n_params,
    }


def attention_temporaries(cfg, st: Shape, core: list[dict]) -> int:
    """Bytes one attention core allocates in its backward on top of what it saved (``core``: its
    saved terms, theory.backward_moments), b sequences of s tokens, a heads, c-byte activations.

    eager / math  the s^2 score gradients, two at a time: softmax's backward reads the gradient of
                  its output (made by att @ v's backward) and writes the gradient of its input,
                  a (b, a, s, s) tensor each, in the probabilities' dtype (fp32 under CUDA
                  autocast, in the decomposed math path and in Hugging Face's eager softmax) or
                  the activation dtype, whichever is wider; every later step (dropout's, the mask's
                  and the scale's backward) again holds one gradient and its successor
    fused SDPA    the gradients of q, k and v (the kernel writes all three, c bytes each: b s a hd
                  for q, b s kv hd for k and v); on CUDA (flash, efficient; from their sources, not
                  measured here) an fp32 accumulator for dq and fp32 per-row statistics, over s
                  padded to the kernel's block (128 flash, 32 efficient), and with grouped heads
                  (kv < a) k's and v's gradients expanded to every head before the sum. On CPU
                  the flash kernel's per-thread work buffers are allocated inside the kernel,
                  below the dispatcher, where MemTracker does not see them: not counted.
    """
    b, s, c = st.batch, st.seq, st.compute_bytes
    sq = b * cfg.n_head * s * s
    probs = [t["nbytes"] for t in core if t["op"] in theory.CORE_OPS]
    if probs:
        return 2 * max(probs[0], sq * c)
    out = next(t["nbytes"] for t in core if t["storage"].endswith(":out"))  # b s a hd, c bytes
    kv = cfg.n_kv_head or cfg.n_head
    grads = out + 2 * out * kv // cfg.n_head
    backend = next(t["op"] for t in core if t["op"].startswith("sdpa_"))[len("sdpa_") :]
    if backend not in ("flash", "efficient"):
        return grads
    block = 128 if backend == "flash" else 32
    padded = math.ceil(s / block) * block
    rows = b * cfg.n_head * padded * 4
    accum = out // (s * c) * padded * 4
    expand = 2 * out if kv != cfg.n_head else 0
    return grads + rows + accum + expand


def mlp_temporaries(act: list[dict], out_grad: int) -> int:
    """Bytes the MLP allocates in its backward beyond what it saved (``act``: its activation's
    saved terms), f the hidden width, the larger of two moments:

    activation  gelu's backward holds the gradient of its output and writes its input's (2 x b s
                f); silu(a) * g's multiplication holds the gradient of its output while writing
                the gradients of silu(a) and of g (3 x b s f, each the size of the saved product)
    projection  proj's backward, one step earlier: its saved input (b s f, freed by the
                activation's moment), the gradient it writes for that input (b s f) and
                ``out_grad``, the gradient of the MLP's output when it is a tensor of its own
                (dropout's backward, or autocast's cast of the fp32 residual gradient to the
                activation dtype: b s h); torch makes proj's bias gradient (h values) after
                its input's, so this moment over-counts by that vector
    """
    mul = [t["nbytes"] for t in act if t["op"] == "mul"]
    width = mul[-1] if mul else max(t["nbytes"] for t in act)  # b s f in the activation dtype
    return max((3 if mul else 2) * width, 2 * width + out_grad)


PHASE = {"attention": "attention_backward", "mlp": "mlp_backward", "recompute": "recompute"}


def backward_moments(cfg, st: Shape, act: dict, params, per_param_grads: bool):
    """(phase, bytes) of each of backward's own moments (theory.backward_moments): the saved
    activations alive then, the gradients that exist by then, those in flight, and at an attention
    moment the core's temporaries (:func:`attention_temporaries`); model state, the batch and the
    loss are the caller's.

    In flight: the residual stream's gradient (b s h, parameter dtype), the gradient entering the
    core or region (b s h, activation dtype: for eager attention it is v's gradient, waiting for q's
    and k's) and, with tied embeddings, the head's weight gradient, which autograd holds until the
    embedding's arrives. Existing gradients (``per_param_grads``; DDP's buckets and FSDP's shards
    are the caller's): a parameter's, in its dtype, once backward has passed the first term its
    module saves (a module that saves nothing: counted).
    """
    n, h, v = st.batch * st.seq, cfg.d_model, cfg.vocab_size
    first = theory.first_saves(cfg, st)
    elem = st.param_bytes
    done = sorted(
        (first.get(p.name.rsplit(".", 1)[0], math.inf), p.numel * elem) for p in params
    )
    at = [j for j, _ in done]
    after = list(itertools.accumulate(nb for _, nb in reversed(done)))[::-1] + [0]
    flight = n * h * st.param_bytes
    flight += v * h * elem if cfg.tie_embeddings else 0
    # the MLP output's own gradient (b s h, activation dtype): made by dropout's backward, or by
    # the residual add's backward casting the parameter-dtype gradient to the activation dtype
    own = cfg.dropout > 0 or st.compute_bytes != st.param_bytes
    out_grad = n * h * st.compute_bytes if own else 0
    out = []
    for m in theory.backward_moments(cfg, st, act["regions"]):
        have = after[bisect.bisect_right(at, m["index"])] if per_param_grads else 0
        extra = 0
        if m["kind"] == "attention":
            extra = attention_temporaries(cfg, st, m["core"]) + n * h * st.compute_bytes
        elif m["kind"] == "mlp":
            extra = mlp_temporaries(m["core"], out_grad)
        out.append((PHASE[m["kind"]], m["alive"] + have + flight + extra))
    return out


@dataclass(frozen=True)
class RankView:
    """What one GPU of a parallel layout holds of the model (recompute_lab.predict.per_gpu): its
    parameters (tensor-parallel local shapes, its pipeline stage's blocks numbered from 0),
    ``layers`` blocks, the tensor-parallel degree (the vocab-parallel head and
    embedding hold 1/tp of the vocabulary) and whether it holds the embeddings (first stage) and
    the head and loss (last stage)."""

    params: tuple
    layers: int
    tp: int = 1
    first: bool = True
    last: bool = True


def param_terms(params, view, step: Shape, impl: str, gather: int) -> tuple:
    """What :func:`predict_peak` needs from the parameter list, one loop over it: (parameters,
    tensors, AdamW's transient bytes, FSDP's unsharded buffers). Kept on a RankView, whose
    parameters never change, per layout setting: the per-GPU planners price one view thousands of
    times and a 405B rank holds over a thousand tensors."""
    key = (step.parallel, step.world_size, step.rank, impl, step.master_weights)
    key += (step.fp32_grad_accum, gather)
    memo = view.__dict__.setdefault("_param_terms", {}) if view is not None else {}
    if key in memo:
        return memo[key]
    groups = [[p.numel for p in params if p.decay], [p.numel for p in params if not p.decay]]
    extra: dict[str, int] = {}
    if step.parallel == "fsdp":
        ws = step.world_size
        groups = [
            [local_rows(p.shape, ws, step.rank) for p in params if p.decay],
            [local_rows(p.shape, ws, step.rank) for p in params if not p.decay],
        ]
        root = [p for p in params if not p.name.startswith("blocks.")]
        block0 = [p for p in params if p.name.startswith("blocks.0.")]
        # Unsharded parameters are views of the padded all-gather output (ws x padded shard).
        extra = {
            "root_unsharded_params": sum(ws * shard_rows(p.shape, ws) for p in root) * gather,
            "last_block_all_gather": sum(ws * shard_rows(p.shape, ws) for p in block0) * gather,
        }
    adam = optimizer_transient(groups, impl, step.master_weights, step.fp32_grad_accum)
    memo[key] = (sum(p.numel for p in params), len(params), adam, extra)
    return memo[key]


def predict_peak(
    cfg, st: Shape, state: dict, act: dict, view: Optional[RankView] = None
) -> Optional[dict]:
    """Peak bytes of one steady-state step on one rank: the largest phase (see the module
    docstring).

    ``state``: theory.model_state_bytes (or its sharded form) of this rank; ``act``:
    predict_activations (under a pipeline: what the schedule keeps in flight). ``view``: the
    rank's part of the model under a parallel layout (None: the whole model). Returns None when
    the activations have no closed form.
    """
    if act.get("total") is None:
        return None
    step = st  # the step's precision and layout travel with the micro-batch shape
    params = param_tensors(cfg) if view is None else list(view.params)
    tp = 1 if view is None else view.tp
    first, last = (True, True) if view is None else (view.first, view.last)
    impl = step.optimizer_impl or adam_impl(st.device, step.parallel)
    per = state["per_param"]
    n_tok, v, h = st.batch * st.seq, cfg.vocab_size, cfg.d_model
    gather = 2 if step.precision == "bf16_master" else st.param_bytes  # FSDP gathers bf16
    n_params, n_tensors, adam, extra = param_terms(params, view, step, impl, gather)
    # 0-d fp32 step counters: on CPU unless fused (then on the parameters' device); the CUDA
    # allocator never
    # sees CPU tensors.
    counters = (
        4 * n_tensors if st.device == "cpu" or (impl == "fused" and st.device != "meta") else 0
    )
    loss, inputs = 4, 16 * n_tok
    buffers = buffer_bytes(cfg)
    if view is not None and theory.external(cfg) is None:  # our GPT's buffers are per block
        buffers = buffers * view.layers // cfg.n_layer
    fixed = per["params"] + per["master"] + per["optimizer"] + counters + buffers
    grads = per["grads"]
    persistent_grads = 4 * n_params if step.fp32_grad_accum and step.master_weights else 0
    # the fp32 gradients of the log-probabilities and logits (vocab-parallel: 1/tp of each)
    head = 2 * n_tok * v * 4 // tp if last else 0
    emb = v * h * st.param_bytes // tp if first else 0  # the embedding's dense gradient
    if step.parallel == "fsdp":
        persistent_grads = 0
    elif step.parallel == "ddp":
        persistent_grads = grads  # gradient_as_bucket_view: the buckets live for the whole run
    phases = {
        "backward_start": fixed
        + persistent_grads
        + act["total"]
        + loss
        + head
        + sum(extra.values()),
        "end_of_backward": fixed
        + grads
        + inputs
        + 2 * loss
        + emb * (2 if cfg.tie_embeddings else 1),
    }
    kept = 0
    if step.grad_clip:
        phases["clip"] = (
            fixed
            + grads
            + inputs
            + loss
            + clip_transient(n_tensors, n_params, step.master_weights, step.fp32_grad_accum)
        )
        kept = (
            8 if step.master_weights else 4
        )  # the total norm the loop keeps (+ MasterWeightAdamW's clip_coef)
    phases["optimizer_step"] = (
        fixed
        + grads
        + inputs
        + loss
        + kept
        + adam
    )
    whole = view is None or (
        view.layers == cfg.n_layer and view.tp == 1 and view.first and view.last
    )
    if act.get("regions") is not None and whole and step.parallel != "fsdp":
        # the theory's saved terms and the plan's regions: backward's own moments, one by one.
        # Besides them: fixed state, DDP's buckets, the batch, the loss and (from backward() on)
        # its gradient. FSDP keeps the bound below: its gathered and reduce-scattered buffers
        # inside backward are not modelled moment by moment.
        held = fixed + persistent_grads + inputs + 2 * loss
        for kind, moment in backward_moments(cfg, st, act, params, step.parallel == "none"):
            phases[kind] = max(phases.get(kind, 0), held + moment)
    elif act.get("largest_region"):
        # only the largest region's bytes are known (the budget planner's priced plans, per-GPU
        # stages, FSDP): the recompute phase holds them beside everything saved and every gradient,
        # an upper bound, non-decreasing in the saved bytes
        phases["recompute"] = (
            state["total"]
            + counters
            + buffers
            + act["total"]
            + loss
            + act["largest_region"]
        )
        if step.parallel == "fsdp":
            # what sharded state does not hold while a block recomputes: the root's unsharded
            # params and fp32 grads (the tied head's is held to the end), this block's and the next
            # block's gathered params, this block's unsharded grads and the previous one's
            # reduce-scatter input
            full_block = extra["last_block_all_gather"] // gather * 4
            phases["recompute"] += (
                extra["root_unsharded_params"]
                + extra["root_unsharded_params"] // gather * 4
                + 2 * extra["last_block_all_gather"]
                + 2 * full_block
            )
    kind = max(phases, key=phases.get)
    out = {
        "total": phases[kind],
        "phase": kind,
        "phases": phases,
        "model_state": state["total"],
        "activations": act["total"],
        "optimizer_impl": impl,
        "step_counters": counters,
        **extra,
    }
    if step.parallel != "none":
        out["unmodelled"] = UNMODELLED[step.parallel]
    return out


# What the phases leave out under data parallelism: moments inside backward, between its start and
# its end.
UNMODELLED = {
    "ddp": "inside backward: each parameter's fresh gradient before DDP copies it into its bucket, "
    "and the tied "
    "head gradient buffered until the embedding's arrives; a peak there is above this prediction",
    "fsdp": "inside backward: a block's unsharded gradients, reduce-scatter buffers and the next "
    "block's "
    "prefetched all-gather, and the tied head gradient buffered until the embedding's arrives; a "
    "peak "
    "there is above this prediction",
}

"""Predicted time of one optimizer step on one card under a parallel layout: compute, recompute,
exposed communication, pipeline bubble and optimizer, then tokens/s, MFU and HFU.

Layer: predict (no torch). The model is analytic and stated here in full; its rates are the card's
datasheet figures (:data:`RATES`, each cited) times efficiencies (:class:`Efficiency`: the knobs a
calibration sets, not properties of the model).

Compute, per layer and micro-batch on one rank (b sequences of s / cp tokens, tp-sharded):
  matmuls     qkv, out, fc, proj and the head (last stage): a roofline per GEMM, the larger of
              FLOPs / (peak x matmul efficiency) and bytes / (HBM x memory efficiency), bytes =
              operands + result; backward runs two GEMMs of the same size (input and weight
              gradients)
  attention   flash kernels: FLOPs 4 b s_q s_k d / tp (QK^T and xV over the full square, as
              recompute_lab.predict.flops counts them) of which the causal half is computed, at
              the attention efficiency; backward 2.5 x forward (FlashAttention-2: five matmuls
              to the forward's two). Eager attention: two batched matmuls over the full square
              plus the fp32 softmax's passes over the s_q x s_k scores at HBM speed
  memory      elementwise work at HBM speed: norms, residual adds, RoPE on q and k, the MLP
              activation (bytes read + written per token, 16-bit activations, norms' statistics
              ignored); backward moves twice the forward's bytes; the loss reads and writes the
              fp32 logits four times (log-softmax forward and backward)
Recompute reruns forward work in backward: ``full`` the block but its last linear (early stop, as
recompute_lab.predict.flops counts it) and the collectives before it, ``selective`` the
attention core (a flash kernel reruns whole), a per-stage ``n/L full`` plan n layers of full on
its base; a budget plan its options' counted FLOPs at matmul speed and pointwise bytes at HBM
speed; op-SAC the block's ops but those its save list keeps (early stop as full), plus its
policy mode's cost per dispatched op; regions the sub-regions it does not save and the unnamed
code between them (torch_remat replays whole regions: no early stop), plus the cost of each named
sub-region; offload nothing, but every saved byte crosses the host link out in forward and back
in backward on the compute stream (exposed). The recomputed FLOPs of every plan equal
FlopCounterMode's count on the wrapped model (tests/unit/test_step_time.py).

Communication, alpha-beta per collective over a ring of n ranks (B: the unsharded buffer):
all-reduce 2 (n - 1) / n B / bw + 2 (n - 1) alpha; all-gather and reduce-scatter half that.
A group lies inside a node when its span does (torchtitan's mesh order pp, dp_replicate,
dp_shard, cp, tp: tp innermost); otherwise the per-GPU network link. Overlap rules:
  tp / sp     two all-reduces (or all-gather + reduce-scatter pairs with SP) per layer in forward,
              two in backward: exposed (on the critical path between dependent GEMMs)
  cp          ring attention passes K/V chunks (cp - 1) times per layer in forward, K/V and their
              gradients in backward: hidden behind the layer's attention compute, the excess
              exposed
  fsdp        parameters all-gathered in forward and again in backward (resharded after
              forward), gradients reduce-scattered in fp32 (bf16_master) once per step: hidden
              behind compute except the first layer's gather and the last layer's scatter, and
              any excess over the step's compute
  dp_replicate  an all-reduce of the gradient shard, hidden behind backward but its last layer
  pp          activations (and their gradients) sent point to point per micro-batch: exposed
Pipeline: a 1F1B step takes (m + p - 1) of the slowest stage's micro-batch times, interleaved
(m + (p - 1) / v); the bubble is the part beyond m. Optimizer: AdamW reads and writes its state
at HBM speed (bytes per parameter of this rank's shard: :data:`ADAMW_BYTES`), gradient clipping
reads the gradients once.

MFU counts model FLOPs (3 x the forward of recompute_lab.predict.flops, head included) per GPU per
second over the dense 16-bit peak (fp32 runs: the fp32 peak); HFU adds the recomputed FLOPs
(Korthikanti et al. 2022).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from recompute_lab.config import ConfigError
from recompute_lab.config.strategies import RegionsConfig
from recompute_lab.predict import layout as L
from recompute_lab.predict.module_plans import SUBREGIONS


@dataclass(frozen=True)
class Rates:
    """What one GPU computes and moves per second (dense, no sparsity), and its links."""

    name: str
    bf16_flops: float  # dense 16-bit tensor-core FLOP/s
    fp32_flops: float  # fp32 FLOP/s without TF32 (fp32 runs' matmuls)
    hbm_bytes_per_s: float
    intra_bytes_per_s: float  # NVLink / Infinity Fabric, per GPU, one direction
    inter_bytes_per_s: float  # the network link per GPU, one direction
    intra_latency_s: float
    inter_latency_s: float
    gpus_per_node: int
    source: str
    # saved tensors offloaded to host memory: bytes/s one way (PCIe) and whether they come back
    # over it (a CPU's "host" is its own memory: save_on_cpu copies once and the unpack is a no-op)
    host_bytes_per_s: float = 0.0
    host_round_trip: bool = True

    def flops(self, precision: str) -> float:
        return self.fp32_flops if precision == "fp32" else self.bf16_flops


@dataclass(frozen=True)
class Efficiency:
    """Fractions of a datasheet rate kernels reach (calibration knobs)."""

    matmul: float = 0.70
    attention: float = 0.50
    memory: float = 0.80
    link: float = 0.80
    # seconds each kernel costs beyond its work (dispatch and launch). 0 on GPUs, where the host
    # runs ahead of the device and launches overlap with kernels; on a CPU, eager dispatch of every
    # aten op is on the critical path (experiments/cpu_time_check.py measures it)
    op_overhead_s: float = 0.0
    # seconds each checkpoint region costs beyond the ops it reruns (saved-tensor hooks, the RNG
    # state it stashes, the recompute's bookkeeping): small beside a GPU step, measured on a CPU
    region_overhead_s: float = 0.0
    # seconds per aten op an op-SAC region dispatches beyond a plain checkpoint's (the policy's
    # dispatch mode sees every op in forward and in the replay), and torch_remat's per op and per
    # named sub-region: Python on the host, small beside a GPU step's kernels, measured on a CPU
    sac_op_overhead_s: float = 0.0
    remat_op_overhead_s: float = 0.0
    remat_region_overhead_s: float = 0.0  # a recomputed named sub-region
    remat_saved_region_overhead_s: float = 0.0  # a saved one (its outputs kept and persisted)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_s"):
                if not (v >= 0 and math.isfinite(v)):
                    raise ConfigError(f"efficiency {f.name} must be >= 0 s, got {v}")
            elif not 0 < v <= 1:
                raise ConfigError(f"efficiency {f.name} must be in (0, 1], got {v}")


# AdamW's traffic per parameter of this rank's shard: fp32 master read + write (8), gradient read
# (4; fp32 under bf16_master's reduce), exp_avg and exp_avg_sq read + write (16), and under
# bf16_master the 16-bit copy written (2).
ADAMW_BYTES = {"bf16_master": 30, "fp32": 28}


def _ring(kind: str, nbytes: float, n: int, bw: float, alpha: float) -> float:
    """Seconds for one ring collective of an ``nbytes`` (unsharded) buffer over ``n`` ranks."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = (n - 1) * (2 if kind == "all_reduce" else 1)
    return steps / n * nbytes / bw + steps * alpha


def group_span(lay, dim: str) -> int:
    """GPUs between the first and last member of a ``dim`` group, plus one (mesh order pp,
    dp_replicate, dp_shard, cp, tp; tp innermost)."""
    order = ("tp", "cp", "dp_shard", "dp_replicate", "pp")
    span = 1
    for d in order[: order.index(dim) + 1]:
        span *= int(getattr(lay, d))
    return span


def link(rates: Rates, eff: Efficiency, lay, dim: str) -> tuple[float, float]:
    """(bytes/s, latency) of ``dim``'s collectives: inside a node or over the network."""
    if group_span(lay, dim) <= rates.gpus_per_node:
        return rates.intra_bytes_per_s * eff.link, rates.intra_latency_s
    return rates.inter_bytes_per_s * eff.link, rates.inter_latency_s


@dataclass(frozen=True)
class Op:
    """One forward op of a layer on one rank: FLOPs, HBM bytes and how it runs."""

    name: str
    kind: str  # matmul | attention | eager_scores | memory
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 1  # aten kernels the op launches in forward


def _gemm(name: str, m: int, k: int, n: int, dt: int) -> Op:
    return Op(name, "matmul", 2.0 * m * k * n, float(dt * (m * k + k * n + m * n)))


def layer_ops(cfg, b: int, s: int, tp: int, cp: int, sp: bool, dt: int) -> list[Op]:
    """The forward ops of one block on one rank for a micro-batch of ``b`` sequences of ``s``
    tokens (each rank holds s / cp of them; ``dt``: bytes per activation element)."""
    d, h = cfg.d_model, cfg.n_head
    hd = d // h
    kv = (cfg.n_kv_head or h) * hd
    sq = s // cp  # this rank's queries
    tok = b * sq
    glu = str(cfg.mlp) == "swiglu"
    fc_out = (2 if glu else 1) * cfg.d_ff
    seq_split = tp if sp else 1  # residual-stream tensors are split over tp only with SP
    ops = [
        _gemm("attn.qkv", tok, d, (d + 2 * kv) // tp, dt),
        _gemm("attn.out", tok, d // tp, d, dt),
        _gemm("mlp.fc", tok, d, fc_out // tp, dt),
        _gemm("mlp.proj", tok, cfg.d_ff // tp, d, dt),
    ]
    core = 4.0 * b * sq * s * d / tp  # QK^T and xV over the full square (flops' convention)
    dropout = float(getattr(cfg, "dropout", 0.0) or 0.0) > 0
    if str(cfg.attention) == "eager":
        scores = float(b * (h // tp) * sq * s * 4)  # fp32 scores, one pass
        # the two batched matmuls (QK^T writes the scores, xV reads the probabilities) and the
        # pointwise passes between them (scale, causal mask, softmax read the scores and write
        # the probabilities; dropout): op-SAC saves the first and reruns the second
        ops.append(Op("attn.core", "eager_scores", core, 2 * scores, 2))
        ops.append(Op("attn.softmax", "eager_scores", 0.0, 2 * scores, 3 + dropout))
    else:
        io = dt * tok * (2 * d + 2 * kv) / tp + dt * b * s * 2 * kv / tp * (cp > 1)
        ops.append(Op("attn.core", "attention", core, io))
    rope = str(cfg.positions) == "rope"
    tok_s = dt * tok / seq_split  # bytes per residual-stream element on this rank, all tokens
    # elementwise work, bytes read + written (and kernels): the two norms (each reads x and writes
    # the normalised x), two residual adds (read two, write one), RoPE on q and k (multiplies, adds
    # and half rotations), the activation (SwiGLU reads gate and up: silu and the product), the
    # residual dropouts
    ops += [
        Op("norm1", "memory", 0.0, 2 * d * tok_s),
        Op("norm2", "memory", 0.0, 2 * d * tok_s),
        Op("residual", "memory", 0.0, 2 * 3 * d * tok_s, 2),
        Op("act", "memory", 0.0, (3 if glu else 2) * cfg.d_ff / tp * dt * tok, 2 if glu else 1),
    ]
    if rope:
        ops.append(Op("rope", "memory", 0.0, 2 * (d + kv) / tp * dt * tok, 10))
    if dropout:
        ops.append(Op("dropout", "memory", 0.0, 2 * 2 * d * tok_s, 2))
    return ops


def op_time(op: Op, peak: float, hbm: float, eff: Efficiency) -> float:
    """Forward seconds of ``op``: its work, plus the per-kernel overhead."""
    mem = op.bytes / (hbm * eff.memory)
    fixed = op.kernels * eff.op_overhead_s
    if op.kind == "matmul":
        return fixed + max(op.flops / (peak * eff.matmul), mem)
    if op.kind == "attention":  # causal: kernels skip the masked half of the blocks
        return fixed + max(0.5 * op.flops / (peak * eff.attention), mem)
    if op.kind == "eager_scores":
        return fixed + op.flops / (peak * eff.matmul) + mem
    return fixed + mem


BACKWARD = {"matmul": 2.0, "attention": 2.5, "eager_scores": 2.0, "memory": 2.0}


# Forward ops a layer reruns in backward, per strategy (selective[...]: its modules). Early stop
# (non-reentrant checkpoint, recompute_lab.predict.flops): a region's last op whose output nobody
# saves is not rerun (mlp.proj in a block, attn.out in attention) unless a dropout follows it.
BLOCK = {"norm1", "attn.qkv", "rope", "attn.core", "attn.softmax", "attn.out", "residual", "norm2",
         "mlp.fc", "act"}  # fmt: skip
RERUN = {
    "none": set(),
    "offload": set(),
    "selective": {"attn.core", "attn.softmax"},
    "selective[core_attn]": {"attn.core", "attn.softmax"},
    "selective[attn]": {"attn.qkv", "rope", "attn.core", "attn.softmax"},
    "selective[mlp]": {"mlp.fc", "act"},
    "selective[norm]": {"norm1", "norm2"},
    "full": BLOCK,
}

# op-SAC (strategy=op): each block is one checkpoint region whose policy saves the outputs of the
# listed aten ops (default: mm, addmm, bmm and the SDPA kernels, recompute_lab.strategies.wrap)
# and reruns every other op. Which of a layer's ops each aten name saves:
OP_SAVES = {
    "addmm": "linear+bias",  # nn.Linear with a bias (without one: mm)
    "mm": "linear",
    "bmm": "attn.core",  # eager attention's QK^T and xV
    "baddbmm": "attn.core",
    "_softmax": "attn.softmax",
    "_safe_softmax": "attn.softmax",
    "gelu": "act",
    "silu": "act",
    "native_layer_norm": "norms",
    "_fused_rms_norm": "norms",
}
DEFAULT_OP_SAVE = ("mm", "addmm", "bmm", "sdpa")
LINEARS = ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj")  # forward order: every_other_mm's count
# regions (torch_remat): the named sub-regions a block's plan saves; unnamed code between them
# (RoPE, residual adds, dropout) always reruns, and the replay has no early stop (an unsaved
# mlp.proj reruns)
SUBREGION_OPS = {
    r: {"attn.core": ("attn.core", "attn.softmax"), "mlp.act": ("act",)}.get(r, (r,))
    for r in SUBREGIONS  # eager attention's core region holds its matmuls and its softmax
}
DEFAULT_REGIONS_SAVE = tuple(RegionsConfig().save)


def _marks(label: str) -> tuple[str, dict]:
    """A label of recompute_lab.config.strategies.label_of, split: 'op(save_ops=mm+addmm,
    every_other_mm=True)' -> ('op', {'save_ops': ['mm', 'addmm'], 'every_other_mm': True});
    'selective[attn+mlp]' -> ('selective', {'modules': ['attn', 'mlp']})."""
    for open_, close, key in (("(", ")", None), ("[", "]", "modules")):
        if open_ in label and label.endswith(close):
            name, inner = label[:-1].split(open_, 1)
            if key:
                return name, {key: inner.split("+")}
            out: dict = {}
            for part in inner.split(","):
                k, _, v = part.partition("=")
                out[k] = v == "True" if v in ("True", "False") else v.split("+")
            return name, out
    return label, {}


def _op_saved(cfg, marks: dict) -> set:
    """The layer's ops whose outputs an op-SAC block's policy saves."""
    save = {str(o).split(".")[-1] if str(o).startswith("aten.") else str(o)
            for o in marks.get("save_ops", DEFAULT_OP_SAVE)}  # fmt: skip
    linear = "addmm" if bool(getattr(cfg, "bias", True)) else "mm"
    saved = set()
    if linear in save:
        saved |= set(LINEARS)
        if marks.get("every_other_mm"):  # the 2nd and 4th projection of a block recompute
            saved -= set(LINEARS[1::2])
    eager = str(cfg.attention) == "eager"
    if (eager and save & {"bmm", "baddbmm"}) or (
        not eager and any(o == "sdpa" or "scaled_dot_product" in o for o in save)
    ):
        saved.add("attn.core")
    for o in save:
        what = OP_SAVES.get(o)
        if what == "norms":
            saved |= {"norm1", "norm2"}
        elif what in ("attn.softmax", "act"):
            saved.add(what)
    return saved


def _regions_saved(marks: dict) -> set:
    """The layer's ops inside the sub-regions a regions plan saves."""
    saved = set()
    for r in marks.get("save", DEFAULT_REGIONS_SAVE):
        saved |= set(SUBREGION_OPS.get(r, ()))
    return saved


def recomputed_ops(strategy: str, dropout: bool = False, cfg=None) -> Optional[set]:
    """Forward ops a layer reruns in backward under ``strategy`` (None: not timed here). op and
    regions labels need the model ``cfg`` (its bias and attention decide what aten ops save)."""
    name, marks = _marks(strategy)
    saved = None
    if name == "op" and cfg is not None:
        saved = _op_saved(cfg, marks)
    elif name == "regions":
        saved = _regions_saved(marks)
    ops = BLOCK - saved if saved is not None else RERUN.get(strategy)
    if name == "regions":  # torch_remat replays its whole region: no early stop at mlp.proj
        ops |= {"mlp.proj"} - saved
    if (
        ops is None
        and name == "selective"
        and all(f"selective[{m}]" in RERUN for m in marks["modules"])
    ):  # several modules: each its own region
        ops = set().union(*(RERUN[f"selective[{m}]"] for m in marks["modules"]))
    if ops is None:
        return None
    if not dropout:
        return set(ops)
    # a dropout after the block's last linear keeps it (unless saved) and the dropout rerunning
    if strategy == "full" or saved is not None:
        return ops | ({"mlp.proj", "dropout"} - (saved or set()))
    tails = {"attn": {"attn.out"}, "mlp": {"mlp.proj"}}  # a dropout follows their last linear
    return ops.union(*(tails.get(m, set()) for m in marks.get("modules", [])))


def regions(strategy: str) -> int:
    """Checkpoint regions per layer under ``strategy`` (selective[norm]: norm1 and norm2)."""
    name, marks = _marks(strategy)
    if name in ("none", "offload"):
        return 0
    return sum(2 if m == "norm" else 1 for m in marks.get("modules", ["core_attn"]))


def n_full(label: str) -> Optional[tuple[str, int]]:
    """(base, n) of a per-stage plan label 'base + n/L full' (recompute_lab.predict.per_gpu's);
    None for a whole strategy."""
    if " + " in label and label.endswith(" full") and "/" in label:
        base, rest = label.split(" + ", 1)
        return base, int(rest.split("/", 1)[0])
    return None


def parse_stage(label: str, layers: int, cfg=None) -> dict:
    """Per-layer strategy counts of a stage's plan label: 'none', 'selective + 3/8 full', ..."""
    mixed = n_full(label)
    if mixed is not None:
        base, n = mixed
        return {base: layers - n, "full": n}
    if recomputed_ops(label, cfg=cfg) is None:
        raise ConfigError(
            f"no step time for strategy {label!r}: {', '.join(RERUN)}, op(...), regions(...) or "
            "'base + n/L full'"
        )
    return {label: layers}


SUBREGIONS_PER_BLOCK = len(SUBREGION_OPS)


def mechanism_s(label: str, eff: Efficiency, dispatched: int) -> float:
    """Seconds per layer the recompute mechanism itself costs beyond the rerun ops and the region:
    op-SAC's policy mode on every dispatched op, torch_remat's hooks and named sub-regions."""
    name, marks = _marks(label)
    if name == "op":
        return dispatched * eff.sac_op_overhead_s
    if name == "regions":
        kept = len(set(marks.get("save", DEFAULT_REGIONS_SAVE)) - {""})
        return (
            dispatched * eff.remat_op_overhead_s
            + (SUBREGIONS_PER_BLOCK - kept) * eff.remat_region_overhead_s
            + kept * eff.remat_saved_region_overhead_s
        )
    return 0.0


def saved_per_layer(cfg, tp: int, sp: bool, b: int, s_local: int, dt: int) -> dict:
    """Bytes and tensors one inner layer saves for backward on one rank under ``none``: the
    memory prediction's own micro-batch (recompute_lab.predict.per_gpu.micro_batch), what offload
    moves."""
    from recompute_lab.predict import per_gpu

    mb = per_gpu.micro_batch(cfg, tp, sp, "none", b, s_local, dt, "cuda")
    return {"bytes": mb["layer"], "tensors": mb["layer_tensors"]}


def offload_s(label: str, moved: Optional[dict], rates: Rates, eff: Efficiency) -> float:
    """Seconds per layer that offloading its saved tensors adds: save_on_cpu copies each one to
    pinned host memory in forward and back in backward, both on the compute stream (the critical
    path); its pack and unpack hooks dispatch one op each per tensor."""
    if label != "offload":
        return 0.0
    if not rates.host_bytes_per_s:
        raise ConfigError(f"no host link rate for {rates.name}: offload cannot be timed there")
    trips = 2 if rates.host_round_trip else 1
    return trips * moved["bytes"] / rates.host_bytes_per_s + 2 * moved["tensors"] * (
        eff.op_overhead_s
    )


def step_time(
    cfg,
    lay,
    strategy,
    batch: int,
    seq: int,
    rates: Rates,
    precision: str = "bf16_master",
    eff: Efficiency = Efficiency(),
    budget_stages: Optional[list] = None,
    dispatched_per_layer: Optional[int] = None,
) -> dict:
    """The predicted seconds of one optimizer step (module docstring) for ``strategy`` on
    ``rates``' card under ``lay``, micro-batch ``batch`` x ``seq`` tokens. ``strategy``: a label
    of recompute_lab.config.strategies.label_of, a 'base + n/L full' plan, or one per pipeline
    rank as a list. ``budget_stages``: per rank, a budget plan's {recompute_flops,
    recompute_pointwise_bytes} per micro-batch (recompute_lab.strategies.budget.layout prices
    them) instead of a strategy. ``dispatched_per_layer``: aten ops one layer's forward
    dispatches (counted by the caller; it prices op-SAC's and torch_remat's per-op costs).
    Returns step_s, the breakdown (compute, recompute, tp / cp / pp / fsdp / dp exposed
    communication, bubble, optimizer), tokens/s, MFU, HFU and per stage their micro-batch
    times."""
    from recompute_lab.predict import flops as F
    from recompute_lab.predict import theory
    from recompute_lab.config.spec import RunSpec, as_model_config

    cfg = as_model_config(cfg)
    tp, pp, cp, v = int(lay.tp), int(lay.pp), int(lay.cp), int(lay.pp_virtual)
    ds, dr = int(lay.dp_shard), int(lay.dp_replicate)
    sp = bool(lay.sp) and tp > 1
    m = L.microbatches(lay)
    dt = 4 if precision == "fp32" else 2
    peak, hbm = rates.flops(precision), rates.hbm_bytes_per_s
    ops = layer_ops(cfg, batch, seq, tp, cp, sp, dt)
    fwd = {op.name: op_time(op, peak, hbm, eff) for op in ops}
    bwd = {op.name: BACKWARD[op.kind] * fwd[op.name] for op in ops}
    layer_fwd, layer_bwd = sum(fwd.values()), sum(bwd.values())

    # tensor parallelism: 2 all-reduces (or AG + RS pairs) per layer each way; a full recompute
    # reruns the forward's collectives before mlp.proj (half of them without SP's pairs: 1 of 2)
    tok = batch * (seq // cp)
    act_bytes = tok * cfg.d_model * dt
    bw_tp, a_tp = link(rates, eff, lay, "tp")
    if sp:
        one = _ring("all_gather", act_bytes, tp, bw_tp, a_tp) + _ring(
            "reduce_scatter", act_bytes, tp, bw_tp, a_tp
        )
        tp_fwd, tp_rerun = 2 * one, 1.5 * one  # AG(qkv), RS(out), AG(fc) rerun
    else:
        one = _ring("all_reduce", act_bytes, tp, bw_tp, a_tp)
        tp_fwd, tp_rerun = 2 * one, one
    # context parallelism: K/V chunks around the ring, hidden behind the attention kernel
    kv = (cfg.n_kv_head or cfg.n_head) * (cfg.d_model // cfg.n_head)
    chunk = 2 * tok * kv * dt / tp
    bw_cp, a_cp = link(rates, eff, lay, "cp")
    cp_f = (cp - 1) * (chunk / bw_cp + a_cp) if cp > 1 else 0.0
    cp_exposed = max(0.0, cp_f - fwd["attn.core"]) + max(0.0, 2 * cp_f - bwd["attn.core"])

    counts = L.stage_layers(cfg.n_layer, pp, v)
    n_chunks = len(counts)
    labels = strategy if isinstance(strategy, list) else [strategy] * pp
    # aten ops one layer's forward dispatches (op-SAC's policy and torch_remat's hooks see each):
    # the caller's count, else the kernels (a lower bound: views dispatch too)
    dispatched = dispatched_per_layer or sum(op.kernels for op in ops)
    moved = saved_per_layer(cfg, tp, sp, batch, seq // cp, dt) if "offload" in labels else None
    head_op = _gemm("head", tok, cfg.d_model, cfg.vocab_size // tp, dt)
    head_f = op_time(head_op, peak, hbm, eff)
    # fp32 logits, 4 passes (upcast, log-softmax, its backward); 5 kernels with the loss's
    loss_f = 4 * tok * cfg.vocab_size / tp * 4 / (hbm * eff.memory) + 5 * eff.op_overhead_s
    # pipeline point-to-point: one activation each way per micro-batch per stage boundary
    bw_pp, a_pp = link(rates, eff, lay, "pp")
    p2p = (act_bytes / (tp if sp else 1) / bw_pp + a_pp) if pp > 1 else 0.0
    stages = []
    for rank in range(pp):
        chunks = range(rank, n_chunks, pp)
        layers = sum(counts[k] for k in chunks)
        last = n_chunks - 1 in chunks
        if budget_stages is not None:  # per step on this rank: per micro-batch is 1/m
            bs = budget_stages[rank]
            rec_flops = bs["recompute_flops"] / m
            rec = rec_flops / (peak * eff.matmul) + bs.get("recompute_pointwise_bytes", 0) / m / (
                hbm * eff.memory
            )
            rerun_tp = tp_rerun * bs.get("chosen", {}).get("block", 0)
        else:
            per = parse_stage(labels[rank], layers, cfg)
            drop = float(getattr(cfg, "dropout", 0.0) or 0.0) > 0
            rec = sum(
                n * (sum(fwd.get(o, 0.0) for o in recomputed_ops(k, drop, cfg)))
                + n * regions(k) * eff.region_overhead_s
                + n * mechanism_s(k, eff, dispatched)
                + n * offload_s(k, moved, rates, eff)
                for k, n in per.items()
            )
            rec_flops = sum(
                n * sum(o.flops for o in ops if o.name in recomputed_ops(k, drop, cfg))
                for k, n in per.items()
            )
            rerun_tp = tp_rerun * per.get("full", 0)
        compute = layers * (layer_fwd + layer_bwd) + ((head_f * 3 + loss_f * 2) if last else 0.0)
        comm = layers * (2 * tp_fwd + cp_exposed) + rerun_tp + 2 * p2p * len(chunks)
        stages.append(
            {
                "rank": rank,
                "layers": layers,
                "compute_s": compute,
                "recompute_s": rec,
                "recompute_flops": rec_flops,  # per micro-batch on one rank of this stage
                "comm_s": comm,
                "micro_batch_s": compute + rec + comm,
            }
        )
    slow = max(stages, key=lambda r: r["micro_batch_s"])
    pipe = m * slow["micro_batch_s"]
    bubble = (pp - 1) / v * slow["micro_batch_s"]

    # FSDP and replicas, per step, for the slowest stage's shard
    n_params_stage = sum(
        math.prod(L.tp_local_shape(p, tp)) for p in L.stage_params(cfg, lay, slow["rank"])
    )
    fsdp = 0.0
    if ds > 1:
        bw, a = link(rates, eff, lay, "dp_shard")
        gathered = n_params_stage * dt
        grads = n_params_stage * 4
        fsdp = 2 * _ring("all_gather", gathered, ds, bw, a) + _ring(
            "reduce_scatter", grads, ds, bw, a
        )
    dp = 0.0
    if dr > 1:
        bw, a = link(rates, eff, lay, "dp_replicate")
        dp = _ring("all_reduce", n_params_stage * 4 / ds, dr, bw, a)
    busy = pipe  # compute the data-parallel traffic can hide behind
    exposed_fsdp = fsdp / max(slow["layers"], 1) + max(0.0, fsdp - busy)
    exposed_dp = dp / max(slow["layers"], 1) + max(0.0, dp - busy / 2)
    shard = n_params_stage / ds
    # + the clip's read; single-tensor AdamW launches about 10 kernels per parameter tensor
    tensors = len(L.stage_params(cfg, lay, slow["rank"]))
    optimizer = shard * (ADAMW_BYTES.get(precision, 28) + 4) / (hbm * eff.memory) + (
        10 * tensors * eff.op_overhead_s
    )
    step = pipe + bubble + exposed_fsdp + exposed_dp + optimizer

    # utilisation: model FLOPs of the whole step over every GPU
    gpus = L.n_gpus(lay)
    seqs = batch * m * ds * dr
    spec = RunSpec(model=cfg)
    # the model FLOPs of the whole step: recompute_lab.predict.flops' forward (head included) x 3
    whole = spec.replace(data__batch_size=seqs, data__seq_len=seq)
    model_flops = 3 * F.predict_step_flops(whole)["forward"]
    # every stage's ranks (tp x cp x data-parallel copies) rerun their share each micro-batch
    recompute_flops = sum(r["recompute_flops"] for r in stages) * m * tp * cp * ds * dr
    tokens = seqs * seq
    breakdown = {
        "compute": m * slow["compute_s"],
        "recompute": m * slow["recompute_s"],
        "comm_exposed": m * slow["comm_s"] + exposed_fsdp + exposed_dp,
        "bubble": bubble,
        "optimizer": optimizer,
    }
    return {
        "step_s": step,
        "breakdown": breakdown,
        "comm": {
            "tp_per_layer_fwd_s": tp_fwd,
            "cp_exposed_per_layer_s": cp_exposed,
            "pp_p2p_s": p2p,
            "fsdp_s": fsdp,
            "fsdp_exposed_s": exposed_fsdp,
            "dp_s": dp,
            "dp_exposed_s": exposed_dp,
        },
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step,
        **F.utilization(model_flops / gpus, recompute_flops / gpus, step, peak),
        "stages": stages,
        "rates": rates.name,
        "efficiency": dataclasses.asdict(eff),
        "n_params": theory.param_count(cfg),
    }


# Datasheet rates per card preset (recompute_lab.predict.devices.CARDS' names), read from
# recompute_lab/assets/gpu_specs.json, which cites a source for every figure and lists the ones
# not confirmed. Dense 16-bit tensor-core peaks (sparsity halved away); links one direction per
# GPU (the bidirectional figures halved); latency per ring step: NCCL's own tuning constants
# (src/graph/tuning.cc: base 6.6 us + 0.6 us per NVLink hop inside a node, + 2.7 us per network
# hop across nodes).
SPECS = Path(__file__).resolve().parent.parent / "assets" / "gpu_specs.json"


def _load_rates() -> dict:
    data = json.loads(SPECS.read_text())
    out = {}
    for name, d in data.items():
        if not isinstance(d, dict) or "bf16_dense_flops" not in d:
            continue  # notes beside the presets
        unconfirmed = d.get("unconfirmed") or []
        out[name] = Rates(
            name,
            float(d["bf16_dense_flops"]),
            float(d["fp32_flops"]),
            float(d["hbm_bytes_per_s"]),
            float(d["intra_node_bytes_per_s"]),
            float(d["inter_node_bytes_per_s"]),
            float(d["intra_node_latency_s"]),
            float(d["inter_node_latency_s"]),
            int(d["gpus_per_node"]),
            f"recompute_lab/assets/gpu_specs.json ({name}; unconfirmed: "
            f"{', '.join(unconfirmed) or 'none'})",
            float(d.get("host_bytes_per_s", 0.0)),
        )
    return out


RATES = _load_rates()


def calibrated(cal: dict, name: str = "calibrated", like: Optional[Rates] = None):
    """(Rates, Efficiency) from rates measured at a model's shapes
    (recompute_lab.measure.hardware.step_time_calibration): the measured GEMM rate stands for the
    peak (efficiency 1), attention's efficiency is its rate relative to that, the measured copy is
    the bandwidth; links and the node come from ``like`` (a card's Rates), else one device."""
    mm = float(cal["matmul_flops_per_s"])
    rates = Rates(
        name,
        mm,
        mm,
        float(cal["copy_bytes_per_s"]),
        like.intra_bytes_per_s if like else 1.0,
        like.inter_bytes_per_s if like else 1.0,
        like.intra_latency_s if like else 0.0,
        like.inter_latency_s if like else 0.0,
        like.gpus_per_node if like else 1,
        f"measured ({name})",
        # offload: a GPU's saved tensors cross its PCIe link (like's); on a CPU save_on_cpu's
        # pack is tensor.cpu() and its unpack tensor.to(cpu): the tensor itself, nothing moves
        # (a GPU's calibration measures its pinned-host copy: host_bytes_per_s)
        float(cal.get("host_bytes_per_s") or (like.host_bytes_per_s if like else math.inf)),
        bool(cal.get("host_bytes_per_s")) or (like.host_round_trip if like else False),
    )
    eff = Efficiency(
        matmul=1.0,
        attention=min(float(cal["attention_flops_per_s"]) / mm, 1.0),
        memory=1.0,
        op_overhead_s=float(cal["op_overhead_s"]),
        region_overhead_s=float(cal["region_overhead_s"]),
        # calibrations from before these were measured price op-SAC's and torch_remat's
        # mechanisms at nothing
        sac_op_overhead_s=float(cal.get("sac_op_overhead_s", 0.0)),
        remat_op_overhead_s=float(cal.get("remat_op_overhead_s", 0.0)),
        remat_region_overhead_s=float(cal.get("remat_region_overhead_s", 0.0)),
        remat_saved_region_overhead_s=float(cal.get("remat_saved_region_overhead_s", 0.0)),
    )
    return rates, eff


def rates_of(name: str) -> Rates:
    """The rates of card preset ``name`` (an error naming the valid presets otherwise)."""
    key = str(name).lower()
    if key not in RATES:
        raise ConfigError(f"no step-time rates for GPU {name!r}; valid: {', '.join(sorted(RATES))}")
    return RATES[key]

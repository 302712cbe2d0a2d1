"""The budget planner's cost model, measured (not assumed) on one-block replicas of the model.

Each option is applied to a one-block replica, on the model's own device (meta for estimates), and
one forward +
backward is run:
- activation bytes: recompute_lab.measure.memory's resident count, the one estimate and the run's
  probe report (every storage the forward made that is still alive, parameters, buffers and the
  loss excluded, the token ids and targets autograd keeps included: 16 B per token), so the SAC
  cache that saved_tensors_hooks cannot see counts too. On meta the forward runs under
  TargetKernels(the run's device): fused RMSNorm, SDPA with native grouped k/v heads and bool
  dropout masks on cuda, so `none` prices exactly what recompute_lab.predict.theory predicts
  (op-SAC options excepted, :func:`measure_replica` says why).
- recompute FLOPs: FlopCounterMode, backward(option) - backward(none), early stop of non-reentrant
checkpoint
  included; the CPU's fused SDPA kernel gets flash attention's formula (FlopCounterMode has none).
  On meta this takes a second replica whose sdpa cores call aten's flash kernel (TargetKernels'
  stand-ins have no backward; SDPA's meta path would count s^2 scores).
- pointwise bytes: bytes read + written in that backward by ops with no FLOP formula (norms,
activations,
  softmax, dropout, adds; views excluded), option minus none. Pointwise recomputation is never free.
A zero-block replica gives what lies outside the blocks (embeddings, dropout mask, final norm,
logits): always
saved, inside the budget (Hugging Face models: a 1-block replica minus one block's increment, so
tensors their
forward makes once for all layers, RoPE's cos and sin, count once). Blocks are identical, so a
plan's bytes and
cost are the zero-block figure plus a sum over blocks of the probed option figures.

Layer: strategies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from tqdm import tqdm

from recompute_lab.config import Arch, Attention
from recompute_lab.measure.memory import older_objects_frozen, saved_tensors
from recompute_lab.measure.target_kernels import TargetKernels
from recompute_lab.model.gpt import GPT, build_model, remember, replica_key
from recompute_lab.config.spec import as_model_config
from recompute_lab.model.precision import shape_dtypes
from recompute_lab.strategies.base import Shape
from recompute_lab.strategies.budget.options import (
    Option,
    apply_option,
    block_options,
    module_names,
)

_aten = torch.ops.aten
TARGETS = ("cpu", "cuda")  # the devices recompute_lab.measure.target_kernels emulates on meta
log = logging.getLogger(__name__)


def _already_shape_wrapped(f):
    """flop_registry's entries take tensors already; FlopCounterMode must not wrap them a second
    time."""

    def g(*args, **kwargs):
        return f(*args, **kwargs)

    g._get_raw = True
    return g


# FlopCounterMode has no formula for the CPU's fused SDPA kernel (it would count 0): give it the
# flash-attention
# ones, which read only the q, k, v (and grad_out) shapes that both kernels take first.
CPU_SDPA_FLOPS = {
    getattr(_aten, cpu): _already_shape_wrapped(flop_registry[cuda])
    for cpu, cuda in (
        ("_scaled_dot_product_flash_attention_for_cpu", _aten._scaled_dot_product_flash_attention),
        (
            "_scaled_dot_product_flash_attention_for_cpu_backward",
            _aten._scaled_dot_product_flash_attention_backward,
        ),
    )
    if hasattr(_aten, cpu) and cuda in flop_registry
}


class PointwiseBytes(TorchDispatchMode):
    """Bytes read + written by ops without a FLOP formula (views excluded): the pointwise work of a
    backward."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            not func.is_view
            and func.overloadpacket not in flop_registry
            and func not in CPU_SDPA_FLOPS
        ):
            self.bytes += sum(
                t.numel() * t.element_size()
                for t in tree_leaves((args, kwargs, out))
                if isinstance(t, torch.Tensor)
            )
        return out


@dataclasses.dataclass
class Measured:
    activation_bytes: int  # saved for backward when the forward returns
    backward_flops: int
    pointwise_bytes: int  # bytes moved in backward by ops without a FLOP formula


def measure_step(
    model: GPT,
    batch: int,
    seq: int,
    count_backward: bool = True,
    autocast: Optional[torch.dtype] = None,
    target: Optional[str] = None,
) -> Measured:
    """One forward (+ backward) of ``model`` on token ids and targets (batch, seq), the forward
    inside ``torch.autocast`` to ``autocast`` when given (as the training loop runs it) and, on the
    meta device, inside TargetKernels(``target``) when given (forward only: those kernels save what
    the target's save but have no backward). Activation bytes are recompute_lab.measure.memory's
    resident count, the one estimate and the run's probe report: every storage the forward made
    that is still alive, plus the token ids and targets autograd keeps (16 B per token)."""
    device = model.tok_emb.weight.device
    idx = torch.zeros(batch, seq, dtype=torch.long, device=device)
    targets = torch.zeros_like(idx)  # a batch's targets are a tensor of their own, as in training
    cast = (
        torch.autocast(device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    kernels = TargetKernels(target) if target is not None else contextlib.nullcontext()

    def forward() -> torch.Tensor:
        # autocast's cache of weight copies is dropped on exit: what stays is what autograd saved
        with cast, kernels:
            return model(idx, targets)

    # older objects out of the collector's sight: the collection in saved_tensors scans only this
    # forward's
    with older_objects_frozen():
        counted = saved_tensors(model, forward)
    loss = counted.pop("output")
    flops, pointwise = 0, 0
    if count_backward:
        counter, moved = (
            FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS),
            PointwiseBytes(),
        )
        with counter, moved:
            loss.backward()
        flops, pointwise = counter.get_total_flops(), moved.bytes
    return Measured(counted["resident_total"], flops, pointwise)


def _flash_core(core: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """AttentionCore forward for sdpa replicas on meta whose FLOPs are counted: aten's
    flash-attention kernel (it has meta kernels and autograd; a GPU's fused kernel reruns whole).
    SDPA itself would take its math path there. Grouped k/v heads are repeated first (FLOPs as for
    native GQA); the bytes come from another forward under TargetKernels (``price``)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    p = core.dropout if core.training else 0.0
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, p, True)[0]


def _with_layers(mcfg: Any, n: int) -> Any:
    return dataclasses.replace(as_model_config(mcfg), n_layer=n)


def replica(
    model: GPT,
    n_layer: int,
    device: torch.device,
    dtype: torch.dtype,
    opt: Optional[Option],
    every: bool = False,
    flash_cores: bool = True,
) -> GPT:
    """A fresh ``n_layer``-block copy of ``model``'s architecture with ``opt`` applied to its first
    block (every block with ``every``); on meta, sdpa cores call aten's flash kernel unless
    ``flash_cores`` is False (a forward under TargetKernels, which replaces SDPA itself)."""
    rep = build_model(_with_layers(model.cfg, n_layer), device, dtype).train()
    meta = torch.device(device).type == "meta"
    if flash_cores and meta and model.cfg.attention == Attention.sdpa:
        if model.cfg.arch == Arch.gpt:
            for block in rep.blocks:  # before any checkpoint wraps it
                block.attn.core.forward = functools.partial(_flash_core, block.attn.core)
        elif hasattr(
            rep, "use_flash_cores"
        ):  # Hugging Face models (recompute_lab.model.hf.adapter)
            rep.use_flash_cores()
    if opt is not None:
        for i in range(n_layer if every else min(n_layer, 1)):
            apply_option(rep, i, opt)
    return rep


def measure_replica(
    model: GPT,
    n_layer: int,
    opt: Optional[Option],
    shape: tuple[int, int, torch.dtype, Optional[torch.dtype]],
    count_backward: bool,
    target: Optional[str],
    every: bool = False,
) -> Measured:
    """:func:`measure_step` of a fresh replica (``shape``: batch, seq, parameter dtype, autocast).
    With ``target`` (meta replicas): the bytes are those of a forward under TargetKernels(target),
    what recompute_lab.predict.theory and estimate's meta count price (fused RMSNorm, native-GQA
    SDPA, bool dropout masks on cuda); the FLOPs and pointwise bytes come from a second replica's
    backward through aten's kernels (TargetKernels' stand-ins have none). Op-SAC options are the
    exception: SAC caches the outputs of the attention kernels it names, and a stand-in is no such
    kernel (its output would be recomputed, 8,704 B less than the CPU keeps on tiny), so they are
    priced on aten's flash kernel, repeated grouped k/v heads included (an upper bound for GQA)."""
    batch, seq, dtype, autocast = shape
    device = model.tok_emb.weight.device

    def make(flash: bool) -> GPT:
        return replica(model, n_layer, device, dtype, opt, every, flash)

    if target is None or (opt is not None and opt.kind == "op"):
        return measure_step(make(True), batch, seq, count_backward, autocast)
    saved = measure_step(make(False), batch, seq, False, autocast, target)
    if not count_backward:
        return saved
    ran = measure_step(make(True), batch, seq, True, autocast)
    return Measured(saved.activation_bytes, ran.backward_flops, ran.pointwise_bytes)


@dataclasses.dataclass
class Price:
    """An option's figures for one block (outside: the zero-block model's), as the solver sees them.
    ``shared``:
    bytes that blocks run this way keep once for all of them (a Hugging Face layer's arguments, e.g.
    the int64
    position ids or eager's float mask, held by every checkpoint region but stored once)."""

    bytes: int
    flops: int
    pointwise_bytes: int
    shared: int = 0


@dataclasses.dataclass
class Probed:
    """Everything the solver needs about one model shape (reusable across budgets)."""

    options: list[Option]
    outside: Price
    prices: list[Price]
    dtype: torch.dtype  # the matmuls' dtype (autocast's, else the parameters')
    batch: int
    seq: int
    param_dtype: Optional[torch.dtype] = None
    autocast: Optional[torch.dtype] = None
    warnings: list[str] = dataclasses.field(
        default_factory=list
    )  # where the prices are bounds, not exact


# probe()'s answers in this process, by what decides them: the replicas are built from the
# model's configuration (never its weights or wrappers), so one configuration, option list,
# micro-batch, dtype pair, device and target kernels always price the same. A second ask (a sweep's
# jobs, the per-rank planners walking layouts of one shape, a test suite) reads it here instead of
# running its replicas again. Bounded: an entry is a few hundred bytes, the oldest go first.
_PRICED: dict[tuple, tuple[Price, list[Price]]] = {}


def _priced_key(model: GPT, options: list[Option], *shape: Any) -> tuple:
    return (*replica_key(model), repr(options), *map(str, shape))


def probe(
    model: GPT,
    options: list[Option],
    batch: int,
    seq: int,
    dtype: torch.dtype,
    autocast: Optional[torch.dtype] = None,
    target: Optional[str] = None,
) -> tuple[Price, list[Price]]:
    """(outside the blocks, one Price per option), all measured on the model's own device with
    parameters in ``dtype``, forwards under ``autocast`` when given; meta replicas save what
    ``target``'s kernels save (:func:`measure_replica`). Asked again in this process with the same
    configuration and shape, the earlier answer (``_PRICED``)."""
    key = _priced_key(model, options, batch, seq, dtype, autocast, target)
    if key in _PRICED:
        log.info(
            "budget: %d options priced earlier in this process (same model and shape)", len(options)
        )
    outside, prices = remember(
        _PRICED, key, lambda: _probe(model, options, batch, seq, dtype, autocast, target)
    )
    return dataclasses.replace(outside), [dataclasses.replace(p) for p in prices]  # callers' copies


def _probe(
    model: GPT,
    options: list[Option],
    batch: int,
    seq: int,
    dtype: torch.dtype,
    autocast: Optional[torch.dtype],
    target: Optional[str],
) -> tuple[Price, list[Price]]:
    device = model.tok_emb.weight.device
    threads = torch.get_num_threads()
    if (
        device.type == "cpu"
    ):  # one block's small ops: dispatch overhead dominates, and extra threads contend
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    log.info(
        "budget: pricing %d options on one-block replicas (batch %d x seq %d, %s, %s)",
        len(options),
        batch,
        seq,
        str(dtype).replace("torch.", ""),
        device.type,
    )
    try:
        with torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []
        ):  # the run's RNG stays put
            # Hugging Face models make some tensors once per forward and share them among layers
            # (RoPE's cos and
            # sin, masks, position ids): a block's own bytes are what a second block run the same
            # way adds; the
            # rest of the 1-layer replica lies outside the blocks (none) or is kept once by any
            # number of blocks
            # run this way (Price.shared).
            hf = hasattr(model, "hf")
            run = (batch, seq, dtype, autocast)
            outside = None if hf else measure_replica(model, 0, None, run, False, target)
            measured, twos = [], []
            bar = tqdm(
                options, desc="budget: pricing options", leave=False, disable=None
            )  # a bar on terminals
            for (
                o
            ) in bar:  # one line per option, on the console too when there is no bar (logs, SLURM)
                t = time.perf_counter()
                measured.append(measure_replica(model, 1, o, run, True, target))
                if hf:
                    twos.append(measure_replica(model, 2, o, run, False, target, every=True))
                log.log(
                    logging.DEBUG if not bar.disable else logging.INFO,
                    "budget: option %d/%d %s priced in %.2f s",
                    len(measured),
                    len(options),
                    o.name,
                    time.perf_counter() - t,
                )
    finally:
        torch.set_num_threads(threads)
    log.info("budget: %d options priced in %.1f s", len(options), time.perf_counter() - t0)
    none = measured[0]  # options[0] is always "none"
    if hf:
        outside = Measured(2 * none.activation_bytes - twos[0].activation_bytes, 0, 0)
        own = [t.activation_bytes - m.activation_bytes for t, m in zip(twos, measured)]
    else:
        own = [m.activation_bytes - outside.activation_bytes for m in measured]
    prices = [
        Price(
            b,
            m.backward_flops - none.backward_flops,
            max(m.pointwise_bytes - none.pointwise_bytes, 0),
            max(m.activation_bytes - outside.activation_bytes - b, 0),
        )
        for b, m in zip(own, measured)
    ]
    return Price(outside.activation_bytes, 0, 0), prices


def kept_weight_copies(model: GPT, opt: Optional[Option], itemsize: int) -> int:
    """Bytes of the low-precision weight copies autocast keeps for backward in one block run as
    ``opt`` (outside
    the blocks, ``opt`` None: the head's): one per Linear that is not inside a recomputed region.
    Op-level and
    region options are counted in full (an upper bound)."""
    if opt is None:
        return model.head.weight.numel() * itemsize
    if opt.kind == "block":
        return 0
    # Linear layers, and any module with a 2-D weight that is not an embedding (Hugging Face's
    # Conv1D: addmm).
    linears = [
        (n, m)
        for n, m in model.blocks[0].named_modules()
        if isinstance(m, nn.Linear)
        or (
            isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() == 2
            and not isinstance(m, nn.Embedding)
        )
    ]
    recomputed = module_names(model, opt.modules) if opt.kind == "modules" else ()
    return sum(
        m.weight.numel() * itemsize
        for n, m in linears
        if not any(n == r or n.startswith(r + ".") for r in recomputed)
    )


AUTOCAST_ON_META = (
    "precision=bf16_autocast on the meta device: autocast has no meta kernels, so each option is "
    "priced on an fp32 replica plus the bf16 weight copies autocast keeps for backward, an upper "
    "bound (the plan keeps a safety margin and saves less than predicted)"
)


TOY_AUTOCAST = (
    "toy_mlp under autocast: block 0 takes the fp32 embedding output, later blocks the bf16 output "
    "of "
    "the block before; every block is priced as block 0, an upper bound for the others (the plan "
    "keeps a "
    "safety margin and may save less than predicted)"
)


def probe_model(model: GPT, shape: Shape) -> Probed:
    """Probe every option of ``model``'s blocks at the run's micro-batch in the run's precision:
    replicas hold
    parameters in the parameter dtype and run their forward under the run's autocast, so an autocast
    plan counts
    the fp32 norm and residual inputs and the bf16 weight copies autocast saves. The meta device has
    no autocast:
    there the prices are an upper bound (fp32 replica + weight copies) and the plan says so in its
    warnings. On meta the bytes are what ``shape.device``'s kernels save (cpu or cuda;
    TargetKernels, as estimate and theory count them)."""
    options = block_options(model)
    device = model.tok_emb.weight.device
    target = shape.device if device.type == "meta" and shape.device in TARGETS else None
    param, autocast = shape_dtypes(shape)
    toy = [TOY_AUTOCAST] if autocast is not None and model.cfg.arch == Arch.toy_mlp else []
    if autocast is not None and device.type == "meta":
        outside, prices = probe(model, options, shape.batch, shape.seq, param, None, target)
        size = torch.empty((), dtype=autocast).element_size()
        outside = dataclasses.replace(
            outside, bytes=outside.bytes + kept_weight_copies(model, None, size)
        )
        prices = [
            dataclasses.replace(p, bytes=p.bytes + kept_weight_copies(model, o, size))
            for p, o in zip(prices, options)
        ]
        return Probed(
            options,
            outside,
            prices,
            autocast or param,
            shape.batch,
            shape.seq,
            param,
            autocast,
            [AUTOCAST_ON_META, *toy],
        )
    outside, prices = probe(model, options, shape.batch, shape.seq, param, autocast, target)
    # Transformer blocks keep the residual stream in the parameter dtype, so every block is block
    # 0's twin; toy
    # blocks under autocast do not (their output is autocast's dtype).
    return Probed(
        options, outside, prices, autocast or param, shape.batch, shape.seq, param, autocast, toy
    )

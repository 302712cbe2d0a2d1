"""The ``budget`` strategy: the cheapest per-block recomputation plan whose saved activations fit a memory budget.

torch.compile's ``activation_memory_budget`` (and torchtitan's ``memory_budget`` built on it) solve this for
compiled graphs only. Here it is done in eager mode, with the strategies that already exist:

1. Options. Each block may run one of a fixed list of *options*, each expressed with existing machinery:
   checkpoint_module on any non-nested subset of {attn.core | attn, mlp.act | mlp, norm1 + norm2}, the whole
   block, an op-level SAC region (recompute_lab.sac, default save list, optionally every other matmul), or a
   torch_remat region with a save list (recompute_lab.remat_regions).
2. Probe (the cost model, measured, not assumed). Each option is applied to a one-block replica of the model,
   on the model's own device (meta for estimates), and one forward + backward is run:
   - activation bytes: storages made in the forward that are still alive when it returns (weak references;
     parameters, buffers, token ids and the loss excluded; deduplicated by storage), so the SAC cache that
     saved_tensors_hooks cannot see counts too. On meta, sdpa replicas call aten's flash-attention kernel (SDPA's
     math path would keep s^2 scores that a GPU's fused kernel does not).
   - recompute FLOPs: FlopCounterMode, backward(option) - backward(none), early stop of non-reentrant
     checkpoint included; the CPU's fused SDPA kernel gets flash attention's formula (FlopCounterMode has none).
   - pointwise bytes: bytes read + written in that backward by ops with no FLOP formula (norms, activations,
     softmax, dropout, adds; views excluded), option minus none. Pointwise recomputation is never free.
   A zero-block replica gives what lies outside the blocks (embeddings, dropout mask, final norm, logits):
   always saved, inside the budget. Blocks are identical, so a plan's bytes and cost are the zero-block figure
   plus a sum over blocks of the probed option figures.
3. Solver. Cost per option: ``objective=flops`` -> (recompute FLOPs, pointwise bytes) compared
   lexicographically; ``objective=time`` -> FLOPs / peak FLOP/s + pointwise bytes / memory bandwidth (a
   roofline with this machine's measured GEMM rate and copy bandwidth; H100 SXM datasheet rates on meta).
   A dynamic programme over the L blocks keeps, for each number of blocks planned, the Pareto set of
   (activation bytes, cost) over all multisets of options; the answer is the cheapest point within the budget.
   This is exact for the cost model (a brute force over every per-block assignment agrees, tests/test_budget.py).

Budget: ``budget_bytes``, or ``device_memory_gb`` (1e9 bytes; minus model state per recompute_lab.theory), or
``budget_fraction`` of ``none``'s predicted activation bytes (the default 0.5). Saved-activation bytes are what
is planned; the transient memory of backward (one block's recomputed activations, gradients) is not.
Out of scope: block groups (layers uniform, sqrt) save one input per group and so reach below full
recomputation; the smallest budget this planner reaches is that of full recomputation.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import itertools
import time
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing.reductions import StorageWeakRef
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from recompute_lab import theory
from recompute_lab.config import Attention, ConfigError, Objective
from recompute_lab.model import GPT, Block, build_model
from recompute_lab.precision import make_precision
from recompute_lab.remat_regions import SUBREGIONS, RngStateHook, _wrap_block, _wrap_subregion
from recompute_lab.sac import default_save_ops, sac_context_fn
from recompute_lab.strategies import Plan, checkpoint_module, option, register

DEFAULT_FRACTION = 0.5
GB = 10 ** 9
# Roofline rates for objective=time on the meta device: H100 SXM datasheet (dense) and HBM3 bandwidth.
META_RATES = {"flops": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}, "bytes_per_s": 3.35e12}


# FlopCounterMode has no formula for the CPU's fused SDPA kernel (it would count 0): give it the flash-attention
# ones, which read only the q, k, v (and grad_out) shapes that both kernels take first.
_aten = torch.ops.aten


def _already_shape_wrapped(f):
    """flop_registry's entries take tensors already; FlopCounterMode must not wrap them a second time."""
    def g(*args, **kwargs):
        return f(*args, **kwargs)
    g._get_raw = True
    return g


CPU_SDPA_FLOPS = {
    getattr(_aten, cpu): _already_shape_wrapped(flop_registry[cuda])
    for cpu, cuda in (("_scaled_dot_product_flash_attention_for_cpu", _aten._scaled_dot_product_flash_attention),
                      ("_scaled_dot_product_flash_attention_for_cpu_backward",
                       _aten._scaled_dot_product_flash_attention_backward))
    if hasattr(_aten, cpu) and cuda in flop_registry}


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to run a block. kind: modules (checkpoint_module on each), block, op (SAC), regions (torch_remat)."""
    name: str
    kind: str
    modules: tuple[str, ...] = ()  # modules: relative names; regions: the sub-regions saved
    every_other_mm: bool = False


def block_options(model: GPT) -> list[Option]:
    """Every option the planner may give a block of ``model`` (nested checkpoints excluded: they rerun twice)."""
    if not all(isinstance(b, Block) for b in model.blocks):  # toy_mlp: any subset of its three modules
        units = [n for n, _ in model.blocks[0].named_children()]
        subsets = [c for k in range(len(units) + 1) for c in itertools.combinations(units, k)]
        return [Option("+".join(c) or "none", "modules", c) for c in subsets] + [Option("block", "block")]
    opts = []
    # Norms go together (as selective's `norm`): each frees only its mean/rstd, (b, s) floats.
    for norms, attn, mlp in itertools.product(((), ("norm1", "norm2")), ((), ("attn.core",), ("attn",)),
                                              ((), ("mlp.act",), ("mlp",))):
        mods = norms + attn + mlp
        opts.append(Option("+".join(mods) or "none", "modules", mods))
    matmuls = ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj")
    return opts + [Option("block", "block"), Option("op", "op"), Option("op-every-other-mm", "op", (), True),
                   Option("regions:save-matmuls+core", "regions", (*matmuls, "attn.core")),
                   Option("regions:save-matmuls", "regions", matmuls)]


def apply_option(model: GPT, i: int, opt: Option, hook: Optional[RngStateHook] = None) -> list[str]:
    """Wrap block ``i`` as ``opt`` says; return the qualified names of the modules that now recompute."""
    block = model.blocks[i]
    if opt.kind == "modules":
        for rel in opt.modules:
            checkpoint_module(block.get_submodule(rel))
        return [f"blocks.{i}.{rel}" for rel in opt.modules]
    if opt.kind == "block":
        checkpoint_module(block)
    elif opt.kind == "op":
        checkpoint_module(block, context_fn=sac_context_fn(default_save_ops(), opt.every_other_mm))
    else:  # regions: everything not in the save list (and dropout, adds, reshapes) reruns
        for r in SUBREGIONS:
            _wrap_subregion(block.get_submodule(r), r, save=r in opt.modules)
        _wrap_block(block, i, hook or RngStateHook(model.tok_emb.weight.device))
    return [f"blocks.{i}"]


# --- probe ---------------------------------------------------------------------------------------------------

def _storage_key(t: torch.Tensor) -> int:
    s = t.untyped_storage()
    return s._cdata if t.device.type == "meta" else s.data_ptr()  # all meta data_ptrs are 0


class _Recorder(TorchDispatchMode):
    """Forward: weak references to every output storage. Backward: bytes moved by ops without a FLOP formula."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[StorageWeakRef, int, int]] = []
        self.pointwise_bytes = 0
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.backward:
            if not func.is_view and func.overloadpacket not in flop_registry and func not in CPU_SDPA_FLOPS:
                self.pointwise_bytes += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                                            if isinstance(t, torch.Tensor))
        else:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    self.refs.append((StorageWeakRef(s), _storage_key(t), s.nbytes()))
        return out


@dataclasses.dataclass
class Measured:
    activation_bytes: int   # saved for backward when the forward returns
    backward_flops: int
    pointwise_bytes: int    # bytes moved in backward by ops without a FLOP formula


def measure_step(model: GPT, batch: int, seq: int, count_backward: bool = True) -> Measured:
    """One forward (+ backward) of ``model`` on token ids (batch, seq); see the module docstring for each figure."""
    device = model.tok_emb.weight.device
    idx = torch.zeros(batch, seq, dtype=torch.long, device=device)
    rec = _Recorder()
    gc.freeze()  # older objects out of the collector's sight: the collection below scans only this forward's
    try:
        with rec:
            loss = model(idx, idx)
        gc.collect()  # reference cycles may still hold storages that nothing uses
    finally:
        gc.unfreeze()
    skip = {_storage_key(t) for t in (*model.parameters(), *model.buffers(), idx, loss)}
    live = {key: n for ref, key, n in rec.refs if not ref.expired() and key not in skip}  # live ones only
    flops = 0
    if count_backward:
        rec.refs, rec.backward = [], True
        counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
        with counter, rec:
            loss.backward()
        flops = counter.get_total_flops()
    return Measured(sum(live.values()), flops, rec.pointwise_bytes)


def _flash_core(core: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """AttentionCore forward for sdpa replicas on meta: aten's flash-attention kernel (it has meta kernels and
    autograd). SDPA itself would take its math path there and keep (b, h, s, s) scores that a GPU's fused kernel
    does not. Grouped k/v heads are repeated first (the copies are kept: a small over-estimate)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    p = core.dropout if core.training else 0.0
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, p, True)[0]


def _with_layers(mcfg: Any, n: int) -> Any:
    if isinstance(mcfg, DictConfig):
        out = copy.deepcopy(mcfg)
        OmegaConf.set_struct(out, False)
        out.n_layer = n
        return out
    return dataclasses.replace(mcfg, n_layer=n)


def _replica(model: GPT, n_layer: int, device: torch.device, dtype: torch.dtype, opt: Optional[Option]) -> GPT:
    rep = build_model(_with_layers(model.cfg, n_layer), device, dtype).train()
    if torch.device(device).type == "meta" and model.cfg.attention == Attention.sdpa:
        for block in rep.blocks:  # before any checkpoint wraps it
            block.attn.core.forward = functools.partial(_flash_core, block.attn.core)
    if opt is not None and n_layer:
        apply_option(rep, 0, opt)
    return rep


@dataclasses.dataclass
class Price:
    """An option's figures for one block (outside: the zero-block model's), as the solver sees them."""
    bytes: int
    flops: int
    pointwise_bytes: int


def probe(model: GPT, options: list[Option], batch: int, seq: int, dtype: torch.dtype) -> tuple[Price, list[Price]]:
    """(outside the blocks, one Price per option), all measured on the model's own device."""
    device = model.tok_emb.weight.device
    threads = torch.get_num_threads()
    if device.type == "cpu":  # one block's small ops: dispatch overhead dominates, and extra threads contend
        torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's RNG stays put
            outside = measure_step(_replica(model, 0, device, dtype, None), batch, seq, count_backward=False)
            measured = [measure_step(_replica(model, 1, device, dtype, o), batch, seq) for o in options]
    finally:
        torch.set_num_threads(threads)
    none = measured[0]  # options[0] is always "none"
    prices = [Price(m.activation_bytes - outside.activation_bytes, m.backward_flops - none.backward_flops,
                    max(m.pointwise_bytes - none.pointwise_bytes, 0)) for m in measured]
    return Price(outside.activation_bytes, 0, 0), prices


# --- cost and solver -------------------------------------------------------------------------------------------

def roofline_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Peak FLOP/s and memory bandwidth for objective=time: measured here (GEMM, copy); H100 datasheet on meta."""
    if device.type == "meta":
        return {"flops": META_RATES["flops"].get(dtype, 67e12), "bytes_per_s": META_RATES["bytes_per_s"],
                "source": "H100 SXM datasheet (meta device)"}
    from recompute_lab.flops import peak_flops  # late: flops imports strategies
    peak, source = peak_flops(device, dtype)
    src = torch.empty(64 * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return {"flops": peak or 67e12, "bytes_per_s": 2 * src.nbytes / best, "source": f"{source}; measured copy"}


def cost_key(price: Price, objective: Objective, rates: Optional[dict]) -> tuple:
    """What the solver minimises for one option (tuples add elementwise and compare lexicographically)."""
    if objective == Objective.time:
        return (price.flops / rates["flops"] + price.pointwise_bytes / rates["bytes_per_s"],)
    return (price.flops, price.pointwise_bytes)


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def undominated(sizes: list[int], costs: list[tuple]) -> list[int]:
    """Indices of the options no other option beats on bytes and cost (ties: the first listed). A dominated
    option is never needed: swapping it for its dominator keeps a plan within budget at no higher cost."""
    keep = []
    for o in sorted(range(len(sizes)), key=lambda o: (sizes[o], costs[o], o)):
        if not keep or costs[o] < costs[keep[-1]]:
            keep.append(o)
    return keep


def pareto_plans(n_layer: int, sizes: list[int], costs: list[tuple]) -> list[tuple[int, tuple, tuple[int, ...]]]:
    """Exact DP over blocks: [(block bytes, cost, option counts)] for every Pareto-optimal multiset of n_layer
    options, by bytes ascending and cost strictly descending. Dominated partial plans can always be swapped for
    their dominator (bytes and cost are both additive), so pruning them after each block loses nothing."""
    # Each layer's frontier point: (bytes, cost, index of its parent in the previous frontier, option added).
    layers = [[(0, tuple(0 for _ in costs[0]), -1, -1)]]
    for _ in range(n_layer):
        cand = [(b + sizes[o], _add(c, costs[o]), i, o) for i, (b, c, _, _) in enumerate(layers[-1])
                for o in range(len(sizes))]
        cand.sort(key=lambda x: (x[0], x[1]))
        frontier = []
        for point in cand:
            if not frontier or point[1] < frontier[-1][1]:
                frontier.append(point)
        layers.append(frontier)
    out = []
    for b, c, parent, o in layers[-1]:
        counts = [0] * len(sizes)
        for depth in range(n_layer, 0, -1):  # walk the parents back to the first block
            counts[o] += 1
            _, _, parent, o = layers[depth - 1][parent] if depth > 1 else (0, 0, -1, -1)
        out.append((b, c, tuple(counts)))
    return out


def cheapest_within(frontier: list, capacity: int) -> Optional[tuple]:
    fitting = [p for p in frontier if p[0] <= capacity]
    return fitting[-1] if fitting else None  # costs fall as bytes rise along the frontier


# --- the strategy ----------------------------------------------------------------------------------------------

def run_context(cfg: Any) -> tuple[int, int, Any]:
    """(batch_size, seq_len, precision config) from the run config that ``cfg`` (its strategy node) belongs to."""
    root = cfg._get_root() if isinstance(cfg, DictConfig) else None
    if root is None or "data" not in root or "precision" not in root:
        raise ConfigError("strategy=budget needs the whole run config (data.batch_size, data.seq_len, precision) "
                          "to probe activations; pass cfg.strategy of a composed config")
    return int(root.data.batch_size), int(root.data.seq_len), root.precision


def resolve_budget(cfg: Any, none_bytes: int, n_params: int, precision: Any) -> dict:
    """The activation budget in bytes and where it comes from (budget_bytes or device_memory_gb beat the fraction)."""
    given, gb = option(cfg, "budget_bytes", None), option(cfg, "device_memory_gb", None)
    fraction = option(cfg, "budget_fraction", DEFAULT_FRACTION)
    if given is not None and gb is not None:
        raise ConfigError("set one of strategy.budget_bytes and strategy.device_memory_gb, not both")
    if given is not None:
        if given <= 0:
            raise ConfigError(f"strategy.budget_bytes must be positive, got {given}")
        return {"bytes": int(given), "source": "budget_bytes"}
    if gb is not None:
        if gb <= 0:
            raise ConfigError(f"strategy.device_memory_gb must be positive, got {gb}")
        state = theory.model_state_bytes(n_params, precision.name, bool(precision.get("fp32_grad_accum", False)))
        left = int(gb * GB) - state["total"]
        if left <= 0:
            raise ConfigError(f"model state alone ({state['total']} B = {n_params} params x {state['bytes_per_param']} "
                              f"B, {precision.name}) exceeds device_memory_gb={gb}: no recomputation plan helps "
                              "(shard the model state, e.g. FSDP/ZeRO, or use more memory)")
        return {"bytes": left, "source": f"device_memory_gb={gb} minus model state {state['total']} B "
                                          f"({state['bytes_per_param']} B/param, {precision.name})",
                "model_state_bytes": state["total"]}
    if not 0 < fraction <= 1:
        raise ConfigError(f"strategy.budget_fraction must be in (0, 1], got {fraction}")
    return {"bytes": int(fraction * none_bytes), "source": f"budget_fraction={fraction} of none's {none_bytes} B"}


@dataclasses.dataclass
class Probed:
    """Everything the solver needs about one model shape (reusable across budgets)."""
    options: list[Option]
    outside: Price
    prices: list[Price]
    dtype: torch.dtype
    batch: int
    seq: int


def probe_model(model: GPT, batch: int, seq: int, precision: Any) -> Probed:
    policy = make_precision(precision)
    dtype = policy.autocast_dtype or policy.param_dtype  # autocast approximated by a replica in its dtype
    options = block_options(model)
    outside, prices = probe(model, options, batch, seq, dtype)
    return Probed(options, outside, prices, dtype, batch, seq)


@register("budget")
def apply_budget(model: GPT, cfg: DictConfig, precision: Any = None, probed: Optional[Probed] = None) -> Plan:
    """Probe (unless ``probed`` is given), solve and apply. The micro-batch shape and precision come from the run
    config that ``cfg`` belongs to; ``precision`` may be given for a plain StrategyConfig with ``probed``."""
    key = None
    if probed is None or precision is None:
        batch, seq, precision = run_context(cfg)
        root = cfg._get_root()
        key = OmegaConf.to_yaml({k: root[k] for k in ("model", "precision", "strategy")}) + f"{batch}x{seq}"
        if key in _PLANS:  # e.g. the meta replica recompute_lab.flops counts: the same plan, not a re-solve
            return _reapply(model, _PLANS[key])
        resolve_budget(cfg, 1, model.get_num_params(), precision)  # bad budgets fail before the probe
        probed = probed or probe_model(model, batch, seq, precision)
    options, outside, prices = probed.options, probed.outside, probed.prices
    objective = Objective(str(option(cfg, "objective", Objective.flops)))
    device = model.tok_emb.weight.device
    rates = roofline_rates(device, probed.dtype) if objective == Objective.time else None
    costs = [cost_key(p, objective, rates) for p in prices]
    n = len(model.blocks)
    none_bytes = outside.bytes + n * prices[0].bytes
    budget = resolve_budget(cfg, none_bytes, model.get_num_params(), precision)
    sizes = [p.bytes for p in prices]
    keep = undominated(sizes, costs)
    frontier = pareto_plans(n, [sizes[o] for o in keep], [costs[o] for o in keep])
    best = cheapest_within(frontier, budget["bytes"] - outside.bytes)
    if best is None:
        smallest = outside.bytes + frontier[0][0]
        raise ConfigError(f"no plan fits an activation budget of {budget['bytes']} B ({budget['source']}); the "
                          f"smallest reachable is {smallest} B (full recomputation of every block; `none` saves "
                          f"{none_bytes} B)")
    _, cost, counts = best
    # Most recomputation in the first blocks (their activations live longest, as Megatron's block method).
    order = sorted((keep[j] for j in range(len(keep)) for _ in range(counts[j])), key=lambda o: prices[o].bytes)
    hook = RngStateHook(device)
    recomputed, chosen = [], []
    for i, o in enumerate(order):
        recomputed += apply_option(model, i, options[o], hook)
        chosen.append(options[o].name)
    plan = {"name": "budget", "recomputed": recomputed, "chosen": chosen, "objective": str(objective),
            "saved": ["per block, what its chosen option keeps (see chosen and option_prices)"],
            "description": f"cheapest per-block plan ({objective}) whose saved activations fit {budget['bytes']} B, "
                           "solved exactly over the probed options",
            "budget": budget, "predicted_activation_bytes": outside.bytes + best[0],
            "predicted_recompute_flops": sum(prices[o].flops for o in order), "cost": list(cost),
            "predicted_pointwise_bytes": sum(prices[o].pointwise_bytes for o in order),
            "none_activation_bytes": none_bytes, "outside_blocks_bytes": outside.bytes,
            "option_prices": {options[o].name: dataclasses.asdict(prices[o]) for o in sorted(set(order))},
            "roofline": rates, "pareto_points": len(frontier),
            "undominated_options": [options[o].name for o in keep],
            "op_level_blocks": [i for i, o in enumerate(order) if options[o].kind in ("op", "regions")],
            "notes": [f"probe: {probed.batch}x{probed.seq} tokens, {str(probed.dtype).replace('torch.', '')} "
                      f"one-block replicas on {device.type}; FLOPs and bytes per micro-batch"]}
    plan["option_kinds"] = {options[o].name: dataclasses.asdict(options[o]) for o in set(order)}
    if key is not None:
        _PLANS[key] = copy.deepcopy(plan)
    return plan


# Plans solved in this process, by run config: a replica of the same run (recompute_lab.flops counts FLOPs on a
# meta replica) gets the plan that was applied to the real model instead of a re-probe on another device.
_PLANS: dict[str, Plan] = {}


def _reapply(model: GPT, plan: Plan) -> Plan:
    plan = copy.deepcopy(plan)
    hook = RngStateHook(model.tok_emb.weight.device)
    for i, name in enumerate(plan["chosen"]):
        apply_option(model, i, Option(**plan["option_kinds"][name]), hook)
    plan["notes"].append("plan reused from the first probe of this run config in this process")
    return plan

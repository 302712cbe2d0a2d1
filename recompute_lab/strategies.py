"""Activation-recomputation strategies: each one rewires how modules run, never what they compute.

A strategy is a function ``(model, strategy_cfg) -> plan`` registered under its config name; the plan is a
JSON-able dict that goes into results.json so analysis (and memory predictions) can explain a run:

    name         the strategy
    recomputed   qualified module names whose forward runs inside a checkpoint region (e.g. "blocks.0.attn.core";
                 for block-group strategies every block of every recomputed group)
    saved        what stays saved for backward (words or module names)
    description  one sentence
    regions      block-group strategies (layers, sqrt, regions): the checkpoint regions as lists of block indices
    offload, offload_effective, warnings   always present (see apply_offload)
    + per strategy: op -> save_ops (and every_other_mm); regions -> save, recompute

Recomputation is torch.utils.checkpoint with ``use_reentrant=False`` and ``preserve_rng_state=True`` so
dropout masks are redrawn identically and gradients equal those of ``none``. Modules are wrapped by replacing
their ``forward`` (not by inserting wrapper modules), and block groups by replacing ``GPT.block_runner``, so
parameter names and state_dicts never change. Op-level SAC lives in recompute_lab.sac, torch_remat regions in
recompute_lab.remat_regions.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from recompute_lab.config import ConfigError, LayerMethod, StrategyConfig
from recompute_lab.model import GPT, Block

Plan = dict[str, Any]
StrategyFn = Callable[[GPT, DictConfig], Plan]
STRATEGIES: dict[str, StrategyFn] = {}


def register(name: str) -> Callable[[StrategyFn], StrategyFn]:
    def deco(fn: StrategyFn) -> StrategyFn:
        STRATEGIES[name] = fn
        return fn
    return deco


def checkpoint_module(module: nn.Module, context_fn: Optional[Callable] = None) -> None:
    """Make ``module`` keep only its inputs for backward and recompute its forward there."""
    if getattr(module, "_recompute_wrapped", False):
        raise ValueError(f"{type(module).__name__} is already checkpointed")
    inner = module.forward
    kwargs: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": True}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn

    @functools.wraps(inner)
    def forward(*args: Any, **kw: Any) -> Any:
        return checkpoint(inner, *args, **kwargs, **kw)

    module.forward = forward  # instance attribute shadows the class method; nn.Module.__call__ finds it
    module._recompute_wrapped = True


def block_names(model: GPT) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


def option(cfg: Any, name: str, default: Any) -> Any:
    """A strategy option, from a DictConfig node or a plain StrategyConfig alike."""
    value = getattr(cfg, name, default)
    return default if value is None else value


def check_names(kind: str, given: list[str], valid: list[str]) -> list[str]:
    """Reject names outside ``valid`` with a ConfigError that lists the valid ones; keep the order given."""
    unknown = [n for n in given if n not in valid]
    if unknown:
        raise ConfigError(f"unknown {kind} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(given))  # drop repeats


def require_transformer_blocks(model: GPT, strategy: str) -> None:
    if not all(isinstance(b, Block) for b in model.blocks):
        raise ConfigError(f"strategy {strategy!r} needs transformer blocks (attention, MLP, norms); the "
                          f"{model.cfg.arch} arch has none. Valid strategies for it: "
                          f"none, full, layers, sqrt, op, offload")


@register("none")
def apply_none(model: GPT, cfg: DictConfig) -> Plan:
    return {"name": "none", "recomputed": [], "saved": ["everything"],
            "description": "every activation saved for backward; nothing recomputed"}


@register("full")
def apply_full(model: GPT, cfg: DictConfig) -> Plan:
    for block in model.blocks:
        checkpoint_module(block)
    return {"name": "full", "recomputed": block_names(model), "saved": ["block inputs"],
            "description": "each block keeps only its input; the whole block's forward reruns in backward"}


# selective: Megatron's recompute_modules. Each option names the submodules (relative to a block) it checkpoints.
SELECTIVE_MODULES: dict[str, tuple[str, ...]] = {
    "core_attn": ("attn.core",),       # QK^T, mask, softmax, dropout, xV (or the one SDPA call)
    "attn": ("attn",),                 # the whole attention sublayer: qkv, core, out projection, dropout
    "mlp": ("mlp",),                   # fc, activation, proj, dropout
    "norm": ("norm1", "norm2"),        # the norms: frees mean/rstd only; the next Linear still saves their output
}


@register("selective")
def apply_selective(model: GPT, cfg: DictConfig) -> Plan:
    require_transformer_blocks(model, "selective")
    chosen = check_names("selective module", list(option(cfg, "modules", ["core_attn"])), list(SELECTIVE_MODULES))
    if not chosen:
        raise ConfigError(f"strategy.modules is empty; choose from {', '.join(SELECTIVE_MODULES)}")
    notes = []
    if "attn" in chosen and "core_attn" in chosen:
        chosen.remove("core_attn")  # already inside the recomputed attention sublayer; nesting would rerun it twice
        notes.append("core_attn is part of attn: checkpointed once, as part of the attention sublayer")
    rel = [r for m in chosen for r in SELECTIVE_MODULES[m]]
    recomputed = []
    for i, block in enumerate(model.blocks):
        for r in rel:
            checkpoint_module(block.get_submodule(r))
            recomputed.append(f"blocks.{i}.{r}")
    return {"name": "selective", "modules": chosen, "recomputed": recomputed, "notes": notes,
            "saved": ["every activation outside the recomputed modules", "the inputs of the recomputed modules"],
            "description": f"per block, {', '.join(rel)} keep only their inputs and rerun in backward "
                           "(Megatron selective recomputation)"}


def run_blocks(blocks: nn.ModuleList, start: int, stop: int, x: Tensor) -> Tensor:
    for i in range(start, stop):
        x = blocks[i](x)
    return x


def checkpoint_groups(model: GPT, groups: list[list[int]]) -> None:
    """Replace the model's block runner: each group of consecutive blocks runs as one checkpoint region.

    Only the input of a group is saved; in backward the whole group's forward reruns. Blocks in no group run
    normally and save everything.
    """
    by_start = {g[0]: g[-1] + 1 for g in groups}

    def runner(blocks: nn.ModuleList, x: Tensor) -> Tensor:
        i = 0
        while i < len(blocks):
            stop = by_start.get(i)
            if stop is None:
                x, i = blocks[i](x), i + 1
            else:
                x = checkpoint(functools.partial(run_blocks, blocks, i, stop), x,
                               use_reentrant=False, preserve_rng_state=True)
                i = stop
        return x

    model.block_runner = runner


def group_plan(name: str, groups: list[list[int]], description: str) -> Plan:
    return {"name": name, "regions": groups, "recomputed": [f"blocks.{i}" for g in groups for i in g],
            "saved": ["inputs of each checkpoint region", "every activation of blocks outside the regions"],
            "description": description}


def chunks(n_layer: int, k: int) -> list[list[int]]:
    """Consecutive groups of k block indices (the last one may be shorter)."""
    return [list(range(s, min(s + k, n_layer))) for s in range(0, n_layer, k)]


def _in_range(key: str, value: int, n_layer: int) -> None:
    if not 1 <= value <= n_layer:
        raise ConfigError(f"strategy.{key}={value} is out of range for model.n_layer={n_layer}; "
                          f"valid values: 1..{n_layer}")


@register("layers")
def apply_layers(model: GPT, cfg: DictConfig) -> Plan:
    n = len(model.blocks)
    method = LayerMethod(str(option(cfg, "method", LayerMethod.uniform)))
    if method == LayerMethod.every:
        every = option(cfg, "every", 2)
        _in_range("every", every, n)
        # torchtitan counts blocks from 1 and checkpoints those whose count is a multiple of N.
        groups = [[i] for i in range(n) if (i + 1) % every == 0]
        what = f"every {every}-th block checkpointed on its own (torchtitan selective_ac_option={every})"
    else:
        k = option(cfg, "num_layers", 1)
        _in_range("num_layers", k, n)
        if method == LayerMethod.uniform:
            groups = chunks(n, k)
            what = f"chunks of {k} consecutive blocks, each one checkpoint region (Megatron uniform)"
        else:
            groups = [[i] for i in range(k)]
            what = f"only the first {k} blocks checkpointed, each on its own (Megatron block)"
    checkpoint_groups(model, groups)
    plan = group_plan("layers", groups, what)
    plan.update(method=str(method), num_layers=option(cfg, "num_layers", 1), every=option(cfg, "every", 2))
    return plan


def sqrt_groups(n_layer: int) -> list[list[int]]:
    """Chen et al. 2016: segments of k ~ sqrt(L) blocks keep L/k segment inputs + one segment's activations."""
    return chunks(n_layer, max(1, round(math.sqrt(n_layer))))


@register("sqrt")
def apply_sqrt(model: GPT, cfg: DictConfig) -> Plan:
    groups = sqrt_groups(len(model.blocks))
    checkpoint_groups(model, groups)
    return group_plan("sqrt", groups, f"{len(groups)} segments of ~sqrt({len(model.blocks)}) = {len(groups[0])} "
                                      "blocks, each one checkpoint region (Chen et al. 2016)")


@register("offload")
def apply_offload_only(model: GPT, cfg: DictConfig) -> Plan:
    # Nothing recomputed; apply_strategy installs the offload (the name implies offload: true).
    return {"name": "offload", "recomputed": [], "saved": ["everything, in host memory"],
            "description": "no recomputation; saved tensors go to host memory in forward and come back for "
                           "backward (DeepSpeed cpu_checkpointing, Megatron cpu_offloading)"}


def apply_offload(model: GPT, plan: Plan) -> None:
    """Wrap the model's forward in torch.autograd.graph.save_on_cpu: every tensor packed for backward in
    forward is copied to host memory (pinned on CUDA, so the copies back can overlap) and unpacked in backward.

    Tensors that a checkpoint region or the SAC cache holds do not pass through these hooks (only the region
    inputs do): combined with recomputation, offload moves what recomputation still saves. On CPU host memory
    is device memory: each saved tensor is copied to another CPU buffer, no memory is freed, and the copies
    cost time. The plan says so and a warning is raised.
    """
    device = model.tok_emb.weight.device
    effective = device.type == "cuda"
    plan.update(offload=True, offload_effective=effective)
    if device.type == "meta":  # shapes only: nothing to copy (save_on_cpu would fail reading meta data)
        plan["notes"].append("meta device: save_on_cpu not installed; on CUDA the saved tensors would move to host")
        return
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kw: Any) -> Any:
        with torch.autograd.graph.save_on_cpu(pin_memory=effective):
            return inner(*args, **kw)

    model.forward = forward
    if not effective:
        msg = (f"offload on {device.type}: save_on_cpu moves nothing (host memory is the device memory here); "
               "saved tensors are only copied, which costs time and frees no memory")
        plan["warnings"].append(msg)
        warnings.warn(msg, stacklevel=3)


# The StrategyConfig fields each strategy reads (offload: all of them). Setting another one is a mistake.
OPTIONS = {"selective": ("modules",), "layers": ("method", "num_layers", "every"),
           "op": ("save_ops", "every_other_mm"), "regions": ("save",),
           "budget": ("budget_bytes", "budget_fraction", "device_memory_gb", "objective")}


def reject_unused_options(cfg: Any) -> None:
    """``+strategy=full strategy.num_layers=2`` would silently do nothing: say which options apply instead."""
    defaults = StrategyConfig()
    used = OPTIONS.get(cfg.name, ())
    for name in (f.name for f in dataclasses.fields(StrategyConfig)):
        if name in ("name", "offload", *used):
            continue
        value, default = getattr(cfg, name, None), getattr(defaults, name)
        value = list(value) if isinstance(value, (list, ListConfig)) else value
        if value != default:
            raise ConfigError(f"strategy.{name} is not an option of strategy {cfg.name!r}; its options: "
                              f"{', '.join((*used, 'offload'))}")


def apply_strategy(model: GPT, cfg: DictConfig) -> Plan:
    """Apply the strategy named ``cfg.name`` to ``model`` in place and return its plan."""
    fn = STRATEGIES.get(cfg.name)
    if fn is None:
        raise ConfigError(f"unknown strategy {cfg.name!r}; valid strategies: {', '.join(sorted(STRATEGIES))}")
    reject_unused_options(cfg)
    plan = fn(model, cfg)
    plan.setdefault("notes", [])
    plan.update(offload=False, offload_effective=False, warnings=[])
    if cfg.name == "offload" or option(cfg, "offload", False):
        apply_offload(model, plan)
    return plan


# op-level SAC and torch_remat regions register themselves on import; imported last because they import
# register/checkpoint_module from this module.
from recompute_lab import remat_regions, sac  # noqa: E402,F401
from recompute_lab import budget  # noqa: E402,F401  (imports sac and remat_regions)

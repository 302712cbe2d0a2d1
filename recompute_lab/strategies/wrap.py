"""The wrapping helpers every strategy is built from (public API; imports nothing else of this
package).

- ``checkpoint_module``: a module keeps only its inputs and reruns its forward in backward
  (torch.utils.checkpoint, ``use_reentrant=False``, ``preserve_rng_state=True``: dropout redraws
  identically).
- ``checkpoint_groups``: consecutive blocks run as one checkpoint region (only the group's input is
saved).
- torch_remat regions: ``remat_block`` makes a block one torch_remat checkpoint region,
``remat_subregion`` names
  a sub-module inside it as saved or recomputed; ``RngStateHook`` keeps torch's generators aligned
  across them.
- op-level SAC: the aten op catalogue and ``sac_context_fn`` (torch.utils.checkpoint's selective
checkpoint
  contexts with a save-list policy).
- ``offload_saved_tensors``: torch.autograd.graph.save_on_cpu around the model's forward.

Modules are wrapped by replacing their ``forward`` (an instance attribute shadows the class method)
and block
groups by replacing ``GPT.block_runner``, so parameter names and state_dicts never change.

Layer: strategies.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import torch
import torch_remat as remat
from torch import Tensor, nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

# SUBREGIONS and chunks live with the torch-free plans; re-exported here.
from recompute_lab.predict.module_plans import SUBREGIONS, chunks  # noqa: F401

# --- torch.utils.checkpoint -----------------------------------------------------------------------


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

    module.forward = forward  # nn.Module.__call__ finds the instance attribute first
    module._recompute_wrapped = True


def run_blocks(blocks: nn.ModuleList, start: int, stop: int, x: Tensor) -> Tensor:
    for i in range(start, stop):
        x = blocks[i](x)
    return x


def checkpoint_groups(model: nn.Module, groups: list[list[int]]) -> None:
    """Replace the model's block runner: each group of consecutive blocks runs as one checkpoint
    region.

    Only the input of a group is saved; in backward the whole group's forward reruns. Blocks in no
    group run
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
                x = checkpoint(
                    functools.partial(run_blocks, blocks, i, stop),
                    x,
                    use_reentrant=False,
                    preserve_rng_state=True,
                )
                i = stop
        return x

    model.block_runner = runner


# --- torch_remat regions --------------------------------------------------------------------------

ALWAYS_RECOMPUTED = ("attn.drop", "mlp.drop")


class RngStateHook:
    """torch_remat RecomputeStateHook keeping torch's generators aligned across recompute (dropout
    masks).

    torch_remat does not restore RNG state itself (``preserve_rng_state`` must stay False): this
    hook snapshots
    the CPU (and CUDA) generator at region entry and after every saved region, and restores them on
    recompute.
    """

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None

    def snapshot(self) -> Any:
        cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None
        return torch.get_rng_state(), cuda

    def restore(self, state: Any) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)


def region_name(part: str, modules: tuple[str, ...], rel: str) -> str:
    """A torch_remat region's name: the part (attn.qkv), or part[module] when several modules play
    it (Hugging Face
    Llama's q/k/v projections: attn.qkv[q_proj], ...; region names must be unique within a
    block)."""
    return part if len(modules) == 1 else f"{part}[{rel.rsplit('.', 1)[-1]}]"


def remat_subregion(module: nn.Module, name: str, save: bool) -> None:
    """Name ``module``'s forward as a torch_remat region inside its block, saved or recomputed.

    A bare (non-region) op that reads a saved region's output during recompute would read a
    placeholder; our
    bare consumers (dropout after out/proj, the head merge after core, RoPE after qkv) need those
    outputs, so a
    saved region persists its output (each tensor of a tuple output) at once with
    ``recompute_needs_tensor``.
    """
    call = remat.region(module.forward, name, recompute=not save)
    if save:

        @functools.wraps(module.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, Tensor):
                    remat.recompute_needs_tensor(t)
            return out

        module.forward = forward
    else:
        module.forward = call


def remat_block(block: nn.Module, index: int, hook: RngStateHook) -> None:
    """Make ``block`` one torch_remat checkpoint region named blocks.INDEX (everything in it reruns
    by default)."""
    if getattr(block, "_recompute_wrapped", False):
        raise ValueError(f"block {index} is already checkpointed")
    block.forward = remat.checkpoint(region_name=f"blocks.{index}", recompute_state_hooks=(hook,))(
        block.forward
    )
    block._recompute_wrapped = True


# --- op-level selective activation checkpointing --------------------------------------------------

# Ops whose outputs may be saved, by aten name (no "aten." prefix, no overload). Kept to ops that
# reach a dispatch
# mode in our models; random ops (bernoulli_, native_dropout) are deliberately absent.
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm")
ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
POINTWISE_OPS = (
    "_softmax",
    "_safe_softmax",
    "gelu",
    "silu",
    "native_layer_norm",
    "_fused_rms_norm",
)
# Counted as "an mm" by every_other_mm: the projections (nn.Linear without / with bias: mm / addmm).
PROJECTION_OPS = ("mm", "addmm")


def available_ops() -> list[str]:
    """Catalogue names that exist in this torch build (the SDPA kernels differ between builds)."""
    return [n for n in (*MATMUL_OPS, *ATTENTION_OPS, *POINTWISE_OPS) if hasattr(torch.ops.aten, n)]


def default_save_ops() -> list[str]:
    """mm, addmm, bmm and every SDPA kernel: the expensive ops whose outputs are cheap to keep for
    their FLOPs."""
    return [n for n in (*MATMUL_OPS[:3], *ATTENTION_OPS) if hasattr(torch.ops.aten, n)]


def draws_random(func: Any, args: tuple, kwargs: dict) -> bool:
    """True when this call consumes the RNG: seeded ops, except attention kernels called with
    dropout_p == 0."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            p = kwargs.get("dropout_p", args[i] if i < len(args) else arg.default_value)
            return bool(p)
    return True


def make_policy(save_ops: list[str], every_other_mm: bool) -> Callable[..., CheckpointPolicy]:
    """A fresh SAC policy for one region call (its matmul counter starts at zero in each block's
    forward).

    torch >= 2.9 asks the policy only during the original forward; the recompute replays the
    recorded decisions,
    so one counter per region call is exact. A saved op is skipped on recompute, so a call that drew
    random
    numbers (SDPA with dropout_p > 0) is recomputed instead: later dropout masks then redraw
    identically.
    """
    packets = {getattr(torch.ops.aten, n) for n in save_ops}
    projections = {getattr(torch.ops.aten, n) for n in PROJECTION_OPS}
    count = {"mm": 0}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        packet = func.overloadpacket
        if packet not in packets or draws_random(func, args, kwargs):
            return CheckpointPolicy.PREFER_RECOMPUTE
        if every_other_mm and packet in projections:
            count["mm"] += 1
            if (
                count["mm"] % 2 == 0
            ):  # torchtitan: the 2nd, 4th, ... projection of a block is recomputed
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE

    return policy


def sac_context_fn(save_ops: list[str], every_other_mm: bool) -> Callable[[], tuple]:
    return lambda: create_selective_checkpoint_contexts(make_policy(save_ops, every_other_mm))


# --- offload --------------------------------------------------------------------------------------

OFFLOAD_REASON = "saved tensors move to host memory"


def offload_saved_tensors(model: nn.Module, plan: Any) -> None:
    """Wrap the model's forward in torch.autograd.graph.save_on_cpu: every tensor packed for
    backward in forward
    is copied to host memory (pinned on CUDA, so the copies back can overlap) and unpacked in
    backward.

    Tensors that a checkpoint region or the SAC cache holds do not pass through these hooks (only
    the region inputs do): combined with recomputation, offload moves what recomputation still
    saves. On CPU host memory is device memory: save_on_cpu's pack is ``tensor.cpu()``, which
    hands back the tensor itself, so nothing moves and nothing is freed; only the hooks run.
    ``plan`` (a recompute_lab.strategies.Plan) records it and a warning is raised.
    """
    device = model.tok_emb.weight.device
    effective = device.type == "cuda"
    plan.offload, plan.offload_effective = True, effective
    # save_on_cpu's pack hooks sit inside the measurement's: the saved-tensor count cannot see its
    # copies.
    plan.activation_reason = plan.activation_reason or f"{plan.name} + offload: {OFFLOAD_REASON}"
    if (
        device.type == "meta"
    ):  # shapes only: nothing to copy (save_on_cpu would fail reading meta data)
        plan.notes.append(
            "meta device: save_on_cpu not installed; on CUDA the saved tensors would move to host"
        )
        return
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kw: Any) -> Any:
        with torch.autograd.graph.save_on_cpu(pin_memory=effective):
            return inner(*args, **kw)

    model.forward = forward
    if not effective:
        msg = (
            f"offload on {device.type}: save_on_cpu moves nothing (host memory is the device "
            f"memory here); "
            "saved tensors are only copied, which costs time and frees no memory"
        )
        plan.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)

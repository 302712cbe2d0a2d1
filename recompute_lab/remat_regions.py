"""The ``regions`` strategy: explicit region-level rematerialization with torch_remat (PyPI ``torch-remat``,
Meta's library that torchtitan offers as its ``remat`` extra).

Each transformer block is one ``torch_remat.checkpoint`` region (everything in it recomputes by default), and
its named sub-modules are ``torch_remat.region`` calls that are either saved (``recompute=False``: their
autograd saves stay on the forward graph and the call is skipped on recompute) or recomputed
(``recompute=True``), per ``strategy.save``:

    norm1, attn.qkv, attn.core, attn.out, norm2, mlp.fc, mlp.act, mlp.proj

Unnamed code between them (head split/merge, RoPE, dropout modules, residual adds) always reruns. This can
express plans per-op SAC cannot, e.g. save mlp.fc but recompute mlp.proj, although both are addmm.

Two torch_remat rules shape the wrapping:
- A bare (non-region) op that reads a saved region's output during recompute would read a placeholder. Our
  bare consumers (dropout after out/proj, the head merge after core, RoPE after qkv) need those outputs, so
  every saved region persists its output right away with ``recompute_needs_tensor`` (the saved-tensor cost
  of "saving a sub-region" is its autograd saves plus its output).
- torch_remat does not restore torch's RNG state (``preserve_rng_state`` must be False); dropout stays
  identical through a ``RecomputeStateHook`` that snapshots the CPU (and CUDA) generator at region entry and
  after every saved region, and restores those snapshots on recompute.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch_remat as remat
from omegaconf import DictConfig
from torch import nn

from recompute_lab.model import GPT
from recompute_lab.strategies import Plan, check_names, option, register, require_transformer_blocks

SUBREGIONS = ("norm1", "attn.qkv", "attn.core", "attn.out", "norm2", "mlp.fc", "mlp.act", "mlp.proj")
ALWAYS_RECOMPUTED = ("attn.drop", "mlp.drop")  # bare modules inside the region, rerun in backward


class RngStateHook:
    """torch_remat RecomputeStateHook keeping torch's generators aligned across recompute (dropout masks)."""

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


def _wrap_subregion(module: nn.Module, name: str, save: bool) -> None:
    call = remat.region(module.forward, name, recompute=not save)
    if save:
        @functools.wraps(module.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            remat.recompute_needs_tensor(out)  # bare consumers read it during recompute
            return out
        module.forward = forward
    else:
        module.forward = call


def _wrap_block(block: nn.Module, index: int, hook: RngStateHook) -> None:
    if getattr(block, "_recompute_wrapped", False):
        raise ValueError(f"block {index} is already checkpointed")
    block.forward = remat.checkpoint(region_name=f"blocks.{index}", recompute_state_hooks=(hook,))(block.forward)
    block._recompute_wrapped = True


@register("regions")
def apply_regions(model: GPT, cfg: DictConfig) -> Plan:
    require_transformer_blocks(model, "regions")
    save = check_names("region in strategy.save", list(option(cfg, "save", [])), list(SUBREGIONS))
    recompute = [r for r in SUBREGIONS if r not in save]
    hook = RngStateHook(model.tok_emb.weight.device)
    for i, block in enumerate(model.blocks):
        for r in SUBREGIONS:
            _wrap_subregion(block.get_submodule(r), r, save=r in save)
        _wrap_block(block, i, hook)
    n = len(model.blocks)
    return {"name": "regions", "save": save, "recompute": recompute, "regions": [[i] for i in range(n)],
            "recomputed": [f"blocks.{i}.{r}" for i in range(n) for r in (*recompute, *ALWAYS_RECOMPUTED)],
            "saved": ["block inputs", *(f"blocks.*.{r} (its autograd saves and its output)" for r in save)],
            "description": "each block is a torch_remat checkpoint region; the named sub-regions in `save` keep "
                           "their activations and are skipped on recompute, the rest reruns in backward"}

"""The ``offload`` strategy: nothing recomputed; every tensor saved for backward goes to host
memory.

The offload itself (torch.autograd.graph.save_on_cpu around the forward) is
recompute_lab.strategies.wrap's
``offload_saved_tensors``, which ``apply_strategy`` installs for this strategy and for any other
strategy with
``offload: true``. On CPU it moves nothing: the plan and a warning say so.
Anchors: DeepSpeed activation_checkpointing.cpu_checkpointing; Megatron-LM --cpu-offloading.

Layer: strategies.
"""

from __future__ import annotations

from recompute_lab.config import StrategyConfig
from recompute_lab.model.gpt import GPT
from recompute_lab.strategies.base import Plan, Shape, register
from recompute_lab.strategies.wrap import OFFLOAD_REASON


@register("offload")
def apply_offload(model: GPT, opts: StrategyConfig, shape: Shape) -> Plan:
    return Plan(
        "offload",
        "no recomputation; saved tensors go to host memory in forward and come back for "
        "backward (DeepSpeed cpu_checkpointing, Megatron cpu_offloading)",
        saved=["everything, in host memory"],
        activation_reason=f"strategy 'offload': {OFFLOAD_REASON}",
    )

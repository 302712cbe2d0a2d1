"""Tensor (+ sequence) parallelism for recompute_lab.model.gpt's GPT with PyTorch's own plans,
measured per rank.

:func:`tp_plan` is torchtitan's Llama plan (torch.distributed.tensor.parallel) for our module names:
vocab-parallel embedding, column-parallel qkv / fc / head, row-parallel attn.out / mlp.proj, and
with sequence
parallelism SequenceParallel norms whose outputs the column-parallel layers all-gather. Applied over
a FAKE
process group (torch.testing._internal.distributed.fake_pg: one process, no communication, real
DTensor
sharding) to a model on the meta device, one forward under recompute_lab.measure.memory's
saved-tensor hook gives
rank 0's saved bytes (DTensors count their local shard) without memory or processes:
:func:`measure_rank`.

:func:`recompute_lab.predict.tp_theory.predict_rank` is the theory beside it (predict layer, no
torch): the
whole model's saved terms with each term split by the rule that the plan implies (sharded over heads
/ d_ff / vocab; residual-stream terms split
along the sequence only with SP; the all-gathered inputs of qkv, fc and head kept whole on every
rank, where
Megatron's SP keeps the 1/t shard and gathers again in backward: that is :data:`GATHERED`).

Our fused qkv and SwiGLU fc weights are split in contiguous row blocks, so rank r holds a
row-permuted
[q_r k_r v_r] / [gate_r up_r] layout of the unsharded matrix: the shapes (hence the memory) are
exact; loading
unsharded weights would need that permutation (torchtitan keeps separate wq/wk/wv, w1/w3 instead).

Layer: measure.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from recompute_lab.predict import theory
from recompute_lab.predict.layout import role_of
from recompute_lab.predict.tp_theory import GATHERED, gathered_excess, predict_rank


# The measurement here, and re-exported beside it: the per-rank theory it is compared with
# (predict/tp_theory).
__all__ = [
    "GATHERED",
    "build_parallel",
    "fake_world",
    "gathered_excess",
    "local_heads",
    "local_param_numel",
    "measure_micro_batch",
    "measure_rank",
    "mesh_of",
    "parallelize",
    "predict_rank",
    "shard_stage",
    "tp_plan",
]


def local_heads(model: nn.Module, tp: int) -> None:
    """Attention modules run on their rank's n_head / tp query and n_kv_head / tp key-value
    heads."""
    for blk in model.blocks:
        blk.attn.n_head //= tp
        blk.attn.n_kv_head //= tp


def tp_plan(model: nn.Module, sp: bool) -> dict:
    """parallelize_module's plan for the whole GPT (torchtitan's, with our names)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    seq = Shard(1)  # the residual stream (b, s, h) split along s (sequence parallelism)
    plan: dict = {
        "tok_emb": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=seq if sp else Replicate()
        )
    }
    if getattr(model, "pos_emb", None) is not None:
        # A learned position table (GPT-2 / GPT-3) is split by rows like the token table: each rank
        # looks up arange(s) in its max_seq_len / t rows and the partial (s, h) outputs are
        # reduced. With SP the reduction is a reduce-scatter along s (dim 0 of the (s, h) output),
        # so each rank adds its own s / t positions to its (b, s / t, h) slice of tok_emb's output.
        plan["pos_emb"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(0) if sp else Replicate()
        )
    if isinstance(
        getattr(model, "head", None), nn.Linear
    ):  # a pipeline stage before the last has no head
        # logits stay vocab-sharded (b, s, v/t) DTensors for loss_parallel's cross-entropy
        plan["head"] = ColwiseParallel(
            input_layouts=seq if sp else Replicate(),
            output_layouts=Shard(-1),
            use_local_output=False,
        )
    for i in range(len(model.blocks)):
        p = f"blocks.{i}"
        col = {"input_layouts": seq} if sp else {}
        row = {"output_layouts": seq} if sp else {}
        plan.update(
            {
                f"{p}.attn.qkv": ColwiseParallel(**col),
                f"{p}.attn.out": RowwiseParallel(**row),
                f"{p}.mlp.fc": ColwiseParallel(**col),
                f"{p}.mlp.proj": RowwiseParallel(**row),
            }
        )
        if sp:
            plan.update({f"{p}.norm1": SequenceParallel(), f"{p}.norm2": SequenceParallel()})
    if sp and not isinstance(model.norm_f, nn.Identity):
        plan["norm_f"] = SequenceParallel()
    return plan


def parallelize(model: nn.Module, mesh, sp: bool) -> nn.Module:
    """Apply the plan on ``mesh`` (1-D, the tp ranks) in place; before any recomputation wrapper, as
    torchtitan
    orders it (TP, then activation checkpointing, then FSDP)."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = mesh.size()
    if tp > 1:
        local_heads(model, tp)
        parallelize_module(model, mesh, tp_plan(model, sp))
    return model


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake default process group of ``world_size`` ranks (this process is rank 0), removed on
    exit."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "a process group already exists in this process: the fake one needs its own"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    """Forget DTensor's sharding-propagation caches (Python's and the C++ fast path's) and its
    redistribution plans. They key on meshes by value and hand back specs holding the mesh they
    first saw, whose process groups die with its world: a later fake world with an equal mesh
    (a 1-D tp mesh after a 2-D one's tp slice) would otherwise build parameters on the dead mesh
    and fail to resolve its group ("Could not resolve the process group registered under the
    name 3")."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import _redistribute

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if native is not None:
        native()
    _redistribute._gen_transform_infos.cache_clear()
    _redistribute.clear_redistribute_planner_cache()


def mesh_of(shape: dict):
    """A device mesh over the fake world, dims named as in ``shape`` (e.g. {"dp_shard": 2, "tp":
    4})."""
    from torch.distributed.device_mesh import DeviceMesh

    n = 1
    for v in shape.values():
        n *= v
    return DeviceMesh("cpu", torch.arange(n).reshape(*shape.values()), mesh_dim_names=tuple(shape))


def build_parallel(cfg, tp: int, sp: bool, strategy=None, dtype=torch.bfloat16, shape=None):
    """A meta GPT of ``cfg`` with the tp plan applied (inside :func:`fake_world`), then ``strategy``
    (a
    StrategyConfig-like node; None: nothing recomputed; a callable: applies itself to the model, and
    the plan is None). Returns (model, plan)."""
    from recompute_lab.model.gpt import build_model
    from recompute_lab.strategies import apply_strategy

    model = build_model(cfg, "meta", dtype)
    parallelize(model, mesh_of({"tp": tp}), sp)
    if callable(strategy):  # a per-block option of the budget planner, applied to every block
        strategy(model)
        plan = None
    else:
        plan = apply_strategy(model, strategy if strategy is not None else {"name": "none"}, shape)
    model.train()
    return model, plan


def measure_rank(model: nn.Module, batch: int, seq: int, target: str = "cuda") -> dict:
    """Rank 0's saved-for-backward bytes of one forward (recompute_lab.measure.memory.saved_tensors'
    dict): the
    vocab-parallel cross-entropy runs under loss_parallel, as torchtitan trains."""
    from torch.distributed.tensor.parallel import loss_parallel

    from recompute_lab.measure.memory import meta_saved_tensors

    with loss_parallel():
        out = meta_saved_tensors(model, batch, seq, target)
    del out["output"]
    return out


def local_param_numel(model: nn.Module) -> dict:
    """Rank 0's parameter elements (a DTensor's local shard) and the bytes of the storages behind
    them (FSDP2
    keeps dim-0 shards in storage padded to a multiple of its ranks)."""
    from recompute_lab.measure.memory import _local, unique_bytes

    params = {id(p): p for p in model.parameters()}.values()
    return {"numel": sum(_local(p).numel() for p in params), "storage_bytes": unique_bytes(params)}


def shard_stage(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 fully_shard over ``mesh`` (1-D): each block one unit, then the root
    (recompute_lab.run.distributed)."""
    from torch.distributed.fsdp import fully_shard

    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def measure_micro_batch(
    cfg,
    tp: int,
    sp: bool,
    strategy,
    b: int,
    s_local: int,
    param_bytes: int = 2,
    target: str = "cuda",
) -> dict:
    """:func:`micro_batch`'s bytes measured: a two-block copy of ``cfg`` on the meta device with
    PyTorch's tp plan over a fake process group (this module), one forward under the saved-tensor
    hook. ``strategy``: a name, a strategy's typed options (op-level SAC's saved ops, ...) or a
    callable that wraps every block (recompute_lab.strategies.budget.layout's per-block options).

    A strategy that keeps tensors outside the pack hook (op-level SAC's cache, a region's kept
    inputs) is counted by what the forward leaves resident instead, on two- and three-block copies:
    a block is the difference, the last stage's share (final norm, head, loss: outside every
    block's plan) is the hook's count, and the first stage's is the rest."""
    def run(n_layer: int) -> dict:
        copy = dataclasses.replace(
            cfg, n_layer=n_layer, max_seq_len=max(int(cfg.max_seq_len), s_local)
        )
        with fake_world(tp):
            model, _ = build_parallel(
                copy,
                tp,
                sp,
                {"name": strategy} if isinstance(strategy, str) else strategy,
                dtype=torch.bfloat16 if param_bytes == 2 else torch.float32,
            )
            return measure_rank(model, b, s_local, target)

    got = run(2)
    by = got["by_module"]
    last = sum(v for k, v in by.items() if role_of(k) == "last")
    if isinstance(strategy, str):
        return {
            "layer": sum(v for k, v in by.items() if theory.covers("blocks.1", k)),
            "first": sum(v for k, v in by.items() if theory.covers("blocks.0", k))
            - sum(v for k, v in by.items() if theory.covers("blocks.1", k))
            + sum(v for k, v in by.items() if role_of(k) == "first"),
            "last": last,
            "total": got["total"],
        }
    layer = run(3)["resident_total"] - got["resident_total"]
    return {
        "layer": layer,
        "first": got["resident_total"] - 2 * layer - last,
        "last": last,
        "total": got["resident_total"],
    }

"""Tensor (+ sequence) parallelism for recompute_lab.model.gpt's GPT with PyTorch's own plans, measured per rank.

:func:`tp_plan` is torchtitan's Llama plan (torch.distributed.tensor.parallel) for our module names:
vocab-parallel embedding, column-parallel qkv / fc / head, row-parallel attn.out / mlp.proj, and with sequence
parallelism SequenceParallel norms whose outputs the column-parallel layers all-gather. Applied over a FAKE
process group (torch.testing._internal.distributed.fake_pg: one process, no communication, real DTensor
sharding) to a model on the meta device, one forward under recompute_lab.measure.memory's saved-tensor hook gives
rank 0's saved bytes (DTensors count their local shard) without memory or processes: :func:`measure_rank`.

:func:`tp_saved_terms` is the theory beside it: recompute_lab.predict.theory.saved_terms of the whole model with each
term split by the rule that the plan implies (sharded over heads / d_ff / vocab; residual-stream terms split
along the sequence only with SP; the all-gathered inputs of qkv, fc and head kept whole on every rank, where
Megatron's SP keeps the 1/t shard and gathers again in backward: that is :data:`GATHERED`).

Our fused qkv and SwiGLU fc weights are split in contiguous row blocks, so rank r holds a row-permuted
[q_r k_r v_r] / [gate_r up_r] layout of the unsharded matrix: the shapes (hence the memory) are exact; loading
unsharded weights would need that permutation (torchtitan keeps separate wq/wk/wv, w1/w3 instead).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import nn

from recompute_lab.predict import theory
from recompute_lab.predict.theory import Saved

# Terms whose tensor the column-parallel layer all-gathers (with SP) and saves whole: Megatron saves the shard.
GATHERED = ("attn.qkv", "mlp.fc", "head")


def local_heads(model: nn.Module, tp: int) -> None:
    """Attention modules run on their rank's n_head / tp query and n_kv_head / tp key-value heads."""
    for blk in model.blocks:
        blk.attn.n_head //= tp
        blk.attn.n_kv_head //= tp


def tp_plan(model: nn.Module, sp: bool) -> dict:
    """parallelize_module's plan for the whole GPT (torchtitan's, with our names)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    seq = Shard(1)  # the residual stream (b, s, h) split along s (sequence parallelism)
    plan: dict = {"tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq if sp else Replicate())}
    if isinstance(getattr(model, "head", None), nn.Linear):  # a pipeline stage before the last has no head
        # logits stay vocab-sharded (b, s, v/t) DTensors for loss_parallel's cross-entropy
        plan["head"] = ColwiseParallel(input_layouts=seq if sp else Replicate(), output_layouts=Shard(-1),
                                       use_local_output=False)
    for i in range(len(model.blocks)):
        p = f"blocks.{i}"
        col = {"input_layouts": seq} if sp else {}
        row = {"output_layouts": seq} if sp else {}
        plan.update({f"{p}.attn.qkv": ColwiseParallel(**col), f"{p}.attn.out": RowwiseParallel(**row),
                     f"{p}.mlp.fc": ColwiseParallel(**col), f"{p}.mlp.proj": RowwiseParallel(**row)})
        if sp:
            plan.update({f"{p}.norm1": SequenceParallel(), f"{p}.norm2": SequenceParallel()})
    if sp and not isinstance(model.norm_f, nn.Identity):
        plan["norm_f"] = SequenceParallel()
    return plan


def parallelize(model: nn.Module, mesh, sp: bool) -> nn.Module:
    """Apply the plan on ``mesh`` (1-D, the tp ranks) in place; before any recomputation wrapper, as torchtitan
    orders it (TP, then activation checkpointing, then FSDP)."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = mesh.size()
    if tp > 1:
        local_heads(model, tp)
        parallelize_module(model, mesh, tp_plan(model, sp))
    return model


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake default process group of ``world_size`` ranks (this process is rank 0), removed on exit."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process: the fake one needs its own")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def mesh_of(shape: dict):
    """A device mesh over the fake world, dims named as in ``shape`` (e.g. {"dp_shard": 2, "tp": 4})."""
    from torch.distributed.device_mesh import DeviceMesh

    n = 1
    for v in shape.values():
        n *= v
    return DeviceMesh("cpu", torch.arange(n).reshape(*shape.values()), mesh_dim_names=tuple(shape))


def build_parallel(cfg, tp: int, sp: bool, strategy=None, dtype=torch.bfloat16, shape=None):
    """A meta GPT of ``cfg`` with the tp plan applied (inside :func:`fake_world`), then ``strategy`` (a
    StrategyConfig-like node; None: nothing recomputed). Returns (model, plan)."""
    from recompute_lab.model.gpt import build_model
    from recompute_lab.strategies import apply_strategy

    model = build_model(cfg, "meta", dtype)
    parallelize(model, mesh_of({"tp": tp}), sp)
    plan = apply_strategy(model, strategy if strategy is not None else {"name": "none"}, shape)
    model.train()
    return model, plan


def measure_rank(model: nn.Module, batch: int, seq: int, target: str = "cuda") -> dict:
    """Rank 0's saved-for-backward bytes of one forward (recompute_lab.measure.memory.saved_tensors' dict): the
    vocab-parallel cross-entropy runs under loss_parallel, as torchtitan trains."""
    from torch.distributed.tensor.parallel import loss_parallel

    from recompute_lab.measure.memory import meta_saved_tensors

    with loss_parallel():
        out = meta_saved_tensors(model, batch, seq, target)
    del out["output"]
    return out


def local_param_numel(model: nn.Module) -> dict:
    """Rank 0's parameter elements (a DTensor's local shard) and the bytes of the storages behind them (FSDP2
    keeps dim-0 shards in storage padded to a multiple of its ranks)."""
    from recompute_lab.measure.memory import _local, unique_bytes

    params = {id(p): p for p in model.parameters()}.values()
    return {"numel": sum(_local(p).numel() for p in params), "storage_bytes": unique_bytes(params)}


def shard_stage(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 fully_shard over ``mesh`` (1-D): each block one unit, then the root (recompute_lab.run.distributed)."""
    from torch.distributed.fsdp import fully_shard

    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ---- theory: the whole model's saved terms, split per rank by the plan ------------------------------------

def _rule(module: str, storage: str) -> str:
    """How the plan splits one saved term: tp (heads, d_ff or vocab), seq (residual stream: over tp with SP),
    gathered (all-gathered Linear input, whole on each rank) or whole (token ids, rope tables, masks, rng)."""
    if storage.endswith(":w_bf16"):
        return "tp"  # autocast's bf16 copy of a sharded weight
    if module == "loss":
        return "tp" if storage == "loss:logp" else "whole"  # vocab-parallel log-probabilities
    if module in ("tok_emb", "pos_emb") or module.endswith(".attn.rotary"):
        return "whole"
    if module.endswith(GATHERED):
        return "gathered"
    if module.endswith(".attn.core"):
        return "whole" if storage.endswith((":causal", ":rng")) else "tp"
    if module.endswith((".attn.out", ".mlp.act", ".mlp.proj")):
        return "tp"
    return "seq"  # norms and the dropouts on the residual stream (drop, attn.drop, mlp.drop)


def _split(nbytes: int, rule: str, tp: int, sp: bool) -> int:
    if rule == "tp" or (rule == "seq" and sp):
        return nbytes // tp
    return nbytes


class TPTheory:
    """theory.predict_activations' architecture interface (saved_terms, region_inputs, reason) for one tp rank."""

    def __init__(self, tp: int, sp: bool):
        self.tp, self.sp = tp, sp

    def saved_terms(self, cfg, st: theory.Setting) -> list[Saved]:
        out = []
        one_head = cfg.n_head // self.tp == 1
        for t in theory.saved_terms(cfg, st):
            rule = _rule(t.module, t.storage)
            stor = t.storage
            if one_head and stor.endswith(".attn.out:in_copy") and theory.sdpa_backend(cfg, st) != "math" \
                    and str(cfg.attention) == "sdpa":
                stor = stor.replace(".attn.out:in_copy", ".attn.core:out")  # (b, 1, s, d) -> (b, s, d): a view
            nbytes = _split(t.nbytes, rule, self.tp, self.sp)
            if one_head and str(cfg.attention) == "eager" and stor.endswith(("core:q_copy", "core:k_copy",
                                                                              "core:v_copy")):
                # one head per rank: a (b, 1, s, hd) view of the qkv output is already a valid bmm operand, so
                # the batched matmul saves that view, i.e. the whole local qkv output (b, s, (a + 2kv) hd / t)
                stor = stor.split(".attn.core:")[0] + ".attn.qkv:out"
                hd = cfg.d_model // cfg.n_head
                nbytes = st.batch * st.seq * (cfg.n_head + 2 * (cfg.n_kv_head or cfg.n_head)) * hd \
                    * st.compute_bytes // self.tp
            why = t.why + f" [tp rule: {rule}]"
            out.append(replace(t, storage=stor, nbytes=nbytes, why=why))
        return out

    def region_inputs(self, cfg, st: theory.Setting, name: str):
        """A region's inputs: head-sharded inside attention and the MLP, else the residual stream's split (with SP
        a recomputed attn / mlp sublayer keeps its sharded input and all-gathers it again in backward)."""
        inputs = theory.region_inputs(cfg, st, name)
        if inputs is None:
            return None
        rule = "tp" if name.endswith((".attn.core", ".mlp.act")) else "seq"
        return [(stor, _split(nb, rule, self.tp, self.sp)) for stor, nb in inputs]

    def reason(self, cfg, st):
        return None


def predict_rank(cfg, st: theory.Setting, tp: int, sp: bool, plan=None) -> dict:
    """theory.predict_activations for one tensor-parallel rank."""
    return theory.predict_activations(cfg, st, plan, source=TPTheory(tp, sp))


def gathered_excess(cfg, st: theory.Setting, tp: int, sp: bool, plan=None) -> int:
    """Bytes per rank that PyTorch's SP keeps above Megatron's: each gathered Linear input saved whole instead of
    its 1/t shard (0 without SP, where the input is replicated in both)."""
    if not sp or tp == 1:
        return 0
    pred = predict_rank(cfg, st, tp, sp, plan)
    if pred["total"] is None:
        return 0
    whole = sum(t["nbytes"] for t in pred["terms"] if t["op"] != "checkpoint" and t["module"].endswith(GATHERED))
    return whole - whole // tp

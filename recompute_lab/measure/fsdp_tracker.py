"""PyTorch's own FSDPMemTracker over training steps of our GPT under FSDP2 (optionally x TP), on
a fake process group under FakeTensorMode: one rank's bytes by category with no memory, GPU or
second process, set beside recompute_lab.predict's per-GPU bytes (issue 27's outside check).

torchtitan's memory estimator (scripts/estimate/estimation.py) runs FSDPMemTracker
(torch.distributed._tools.fsdp2_mem_tracker) over a model built under FakeTensorMode on a
``fake`` process group (FakeStore). We do the same, with these differences found on torch 2.13
(CPU build):

- device ``cpu``: FSDP2 and the tracker run on fake CPU tensors, and on CPU MemTracker counts each
  storage's exact bytes (on CUDA it rounds every storage up to the caching allocator's 512 B
  blocks), so the comparison is byte-exact. torchtitan uses cuda; there is no CUDA device here.
- FSDP x TP: torchtitan's estimator refuses TP. It runs here when the TP plan
  (recompute_lab.measure.tensor_parallel) and fully_shard are applied OUTSIDE the fake mode to
  parameters created inside it: FSDP2 joins the dp and tp meshes of each TP parameter, and
  DeviceMesh finds its coordinates with ``nonzero`` on a real int tensor, which FakeTensorMode
  refuses. Fake parameters keep dispatching to their own fake mode outside it.
- clip_grad_norm_ cannot stack norms that live on two meshes (under TP the norm
  weights sit on the 1-D dp mesh, the sharded matrices on the 2-D one): :func:`clip_by_mesh`
  takes one norm per mesh, as torchtitan's clipping does.
- recomputation (``none`` / ``full``: recompute_lab.strategies) is applied after TP and before
  fully_shard, torchtitan's order.

Precision as recompute_lab.run.distributed trains under fsdp: ``fp32`` shards fp32 parameters;
``bf16_master`` shards fp32 parameters too (they are the master weights) and gathers bf16 copies
(MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)). AdamW with
recompute_lab.model.precision's parameter groups. Two steps run and the tracker sees the second:
the first makes AdamW's state, and FSDP2's lazy init replaces the storages of short (uneven)
shards, which the tracker would file as activations.

The comparison (:func:`crosscheck`): :func:`predicted` takes per_gpu.stage_bytes' model state,
activations and peak for the layout on CPU kernels; :func:`named_terms` gives, from the shapes
alone, every term by which the tracker's categories may differ (AdamW's step counters filed as
optimizer state, a short last chunk's unpadded moments, the int64 batch filed as inputs, the
loss, a tied head the TP plan unties). Parameters, gradients, optimizer state, buffers and saved
activations leave no residual on the test grid and on Llama-3 8B / 70B
(experiments/fsdp_crosscheck.py); the peak is exact where predict_peak's phases hold it.

Layer: measure.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from recompute_lab.config import ConfigError, OptimizerConfig, PrecisionConfig
from recompute_lab.model.gpt import build_model
from recompute_lab.model.precision import PrecisionPolicy, make_precision
from recompute_lab.measure.tensor_parallel import mesh_of, parallelize
from recompute_lab.strategies import apply_strategy

# FSDPMemTracker's reference types (_FSDPRefType names) -> our category names.
CATEGORIES = {
    "SHARDED_PARAM": "params",
    "SHARDED_GRAD": "grads",
    "OPT": "optimizer",
    "BUFFER": "buffers",
    "UNSHARDED_PARAM": "unsharded_params",
    "UNSHARDED_GRAD": "unsharded_grads",
    "ALL_GATHER": "all_gather",
    "REDUCE_SCATTER": "reduce_scatter",
    "ACT": "activations",
    "TEMP": "temp",
    "INP": "inputs",
}
PRECISIONS = ("fp32", "bf16_master")


def by_category(snapshot: dict) -> dict:
    """A tracker snapshot ({device: {reftype: bytes, "Total": bytes}}) as {category: bytes} summed
    over devices, every category present (0 when empty), plus ``total``."""
    out = {name: 0 for name in CATEGORIES.values()}
    out["total"] = 0
    for dev_snap in snapshot.values():
        for key, nbytes in dev_snap.items():
            name = "total" if key == "Total" else CATEGORIES[getattr(key, "name", str(key))]
            out[name] += int(nbytes)
    return out


def fsdp_policy(precision: str):
    """(the fp32 policy the optimizer is built from, fully_shard's mp_policy or None)."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"the FSDP tracker runs precision {' or '.join(PRECISIONS)}, not {precision!r} "
            "(bf16_autocast has no fake-mode path here, as estimate.layout refuses it)"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = make_precision(PrecisionConfig(name=precision))
    mp = (
        MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=torch.float32)
        if policy.master_weights
        else None
    )
    return PrecisionPolicy(precision, torch.float32), mp


def clip_by_mesh(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """clip_grad_norm_ over DTensor gradients that live on different meshes: the norm of each
    mesh's gradients (a replicated full tensor), combined into the global norm, then every gradient
    scaled."""
    groups: dict[int, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(id(p.grad.device_mesh), []).append(p)
    norms = [
        torch.nn.utils.get_total_norm([p.grad for p in g]).full_tensor() for g in groups.values()
    ]
    total = torch.linalg.vector_norm(torch.stack(norms))
    for g in groups.values():  # one foreach kernel per mesh: it cannot mix two
        torch.nn.utils.clip_grads_with_norm_(g, max_norm, total)
    return total


def shard(model: nn.Module, mesh, mp_policy) -> nn.Module:
    """fully_shard each block, then the root (recompute_lab.run.distributed's order)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def clear_dtensor_caches() -> None:
    """Forget DTensor's cached sharding propagations and redistribution plans (private, torch
    2.13). They hold the meshes of earlier fake worlds, which compare equal to a new world's mesh of
    the same shape but name its destroyed process groups: a second world in one process then fails
    with
    "Could not resolve the process group registered under the name N"."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    ShardingPropagator._propagate_tensor_meta_cached.cache_clear()
    _redistribute._gen_transform_infos.cache_clear()
    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ dispatch fast path's own cache


@contextlib.contextmanager
def fake_rank(world_size: int, rank: int):
    """This process as rank ``rank`` of a fake default process group (FakeStore: no peers, no
    communication), removed on exit. Rank 0's view is recompute_lab.measure.tensor_parallel's
    fake_world; the last rank holds FSDP2's short (padded) shards."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not one of the {world_size} ranks")
    clear_dtensor_caches()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        clear_dtensor_caches()


def track_fsdp_step(
    model_cfg,
    dp_shard: int,
    tp: int = 1,
    precision: str = "fp32",
    batch: int = 1,
    seq: Optional[int] = None,
    sp: bool = False,
    grad_clip: float = 1.0,
    device: str = "cpu",
    rank: int = 0,
    strategy: str = "none",
) -> dict:
    """Rank ``rank``'s bytes by category (:data:`CATEGORIES`) in the second of two training steps
    (forward, backward, gradient clipping, AdamW step, zero_grad; the tracker sees the second) of
    ``model_cfg`` (a ModelConfig) with recomputation ``strategy``, under FSDP2 over ``dp_shard``
    ranks x TP over ``tp`` ranks (sequence parallel if ``sp``); global rank r sits at
    (dp_shard index, tp index) = divmod(r, tp).

    Returns ``after_forward`` (the forward's loss exists: activations are what it keeps),
    ``after_step`` (after the optimizer step, before zero_grad: the model state), ``peak`` (the
    tracker's peak snapshot over both steps), and the run's ``layout`` / ``shape``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.tensor.parallel import loss_parallel

    cfg = model_cfg
    seq = int(seq or cfg.max_seq_len)
    if seq > cfg.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=seq)
    policy, mp = fsdp_policy(precision)
    snaps: dict = {}
    with fake_rank(dp_shard * tp, rank):
        mesh = mesh_of({"dp_shard": dp_shard, "tp": tp})
        fake = FakeTensorMode()
        with fake:
            model = build_model(cfg, "meta", policy.param_dtype)
        # Outside the fake mode: mesh bookkeeping runs on real int tensors (module docstring).
        parallelize(model, mesh["tp"], sp)
        apply_strategy(model, {"name": strategy})  # TP, recomputation, FSDP: torchtitan's order
        shard(model, mesh["dp_shard"], mp)
        with fake:
            model.to_empty(device=device)
            model.train()
            optimizer = policy.build_optimizer(model, OptimizerConfig())
            idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
            targets = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
            params = list(model.parameters())

            def step(tracker=None) -> None:
                with loss_parallel() if tp > 1 else contextlib.nullcontext():
                    loss = model(idx, targets)
                    if tracker is not None:
                        snaps["after_forward"] = by_category(tracker.get_tracker_snapshot())
                    loss.backward()
                if grad_clip > 0:
                    if tp > 1:
                        clip_by_mesh(params, grad_clip)
                    else:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                if tracker is not None:
                    snaps["after_step"] = by_category(tracker.get_tracker_snapshot())
                optimizer.zero_grad(set_to_none=True)

            # Untracked first step: FSDP2's lazy init re-pads the short shards to_empty left
            # unpadded (new storages the tracker would file as activations) and AdamW makes its
            # state. The tracked step is a steady one.
            step()
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((idx, targets))
            with tracker:
                step(tracker)
            snaps["peak"] = by_category(tracker.get_tracker_snapshot("peak"))
    return {
        **snaps,
        "layout": {"dp_shard": dp_shard, "tp": tp, "sp": sp, "gpus": dp_shard * tp, "rank": rank},
        "shape": {"batch": batch, "seq": seq, "precision": precision, "device": device},
        "strategy": strategy,
        "tensors": len(params),
    }


# ---- the comparison with recompute_lab.predict
# ------------------------------------------------------------------

# Categories compared to the byte: the model state after the optimizer step, the buffers, and what
# the forward leaves saved for backward (the tracker's "after_forward" snapshot).
COMPARED = ("params", "grads", "optimizer", "buffers", "activations")
ROWS = (*COMPARED, "model_state", "peak")


def layout_of(dp_shard: int, tp: int = 1, sp: bool = False):
    from recompute_lab.config import LayoutConfig

    return LayoutConfig(tp=tp, dp_shard=dp_shard, sp=sp and tp > 1)


def predicted(cfg, lay, strategy: str, batch: int, seq: int, precision: str) -> dict:
    """recompute_lab.predict's bytes for one GPU of ``lay`` (its dp rank 0) on CPU kernels, by
    category: model state from per_gpu.stage_bytes split by layout.model_state_per_rank
    (bf16_master's fp32 shards are the params: ``master`` is 0 under FSDP), buffers from
    peak.buffer_bytes (the ones predict_peak adds), activations and the step's peak (``peak``, its
    binding ``phase``) from per_gpu.stage_bytes. No tracker runs: the committed table's
    prediction column is this."""
    from recompute_lab.predict import layout as L
    from recompute_lab.predict.peak import buffer_bytes
    from recompute_lab.predict.per_gpu import stage_bytes

    L.validate_layout(lay, cfg, seq)
    if int(lay.pp) != 1 or int(lay.cp) != 1:
        raise ConfigError("the FSDP cross-check runs pp = cp = 1 layouts")
    row = stage_bytes(cfg, lay, strategy, batch, seq, precision, "cpu")[0]
    per = L.model_state_per_rank(cfg, lay, precision)["per_param"]
    out = {
        "params": per["params"] + per["master"],
        "grads": per["grads"],
        "optimizer": per["optimizer"],
        "buffers": buffer_bytes(cfg),
        "activations": row["activations"],
        "model_state": row["model_state"],
        "peak": row["total"],
        "phase": row["phase"],
    }
    split = out["params"] + out["grads"] + out["optimizer"]
    if split != out["model_state"]:  # two predict functions disagree: not the tracker's business
        raise AssertionError(
            f"stage_bytes' model state {out['model_state']} != model_state_per_rank's {split}"
        )
    return out


def named_terms(cfg, lay, batch: int, seq: int, rank: int = 0) -> dict:
    """Per row of :data:`ROWS`, the named terms (name, bytes: tracker minus prediction) by which
    the tracker's figure on global rank ``rank`` differs from :func:`predicted`'s, each from the
    shapes alone. Global rank r is (dp rank, tp rank) = divmod(r, tp)."""
    from recompute_lab.predict import layout as L
    from recompute_lab.predict.peak import ParamTensor, local_rows, shard_rows

    tp, ds = int(lay.tp), int(lay.dp_shard)
    dp_rank = rank // tp
    shapes = [L.tp_local_shape(p, tp) for p in L.stage_params(cfg, lay, 0)]
    terms: dict = {k: [] for k in ROWS}
    untied = bool(cfg.tie_embeddings) and tp > 1
    if untied:
        # measure.tensor_parallel distributes tok_emb.weight and head.weight one by one: two
        # DTensors, the tie is gone. The prediction keeps one matrix.
        head = L.tp_local_shape(ParamTensor("head.weight", (cfg.vocab_size, cfg.d_model)), tp)
        why = "untied head: the TP plan makes head.weight a parameter of its own"
        terms["params"].append((why, 4 * shard_rows(head, ds)))
        terms["grads"].append((why, 4 * shard_rows(head, ds)))
        terms["optimizer"].append((why + " (its AdamW moments)", 8 * local_rows(head, ds, dp_rank)))
    n_tensors = len(shapes) + (1 if untied else 0)
    short = sum(local_rows(s, ds, dp_rank) - local_rows(s, ds, 0) for s in shapes)
    if short:
        why = (
            f"dp rank {dp_rank}'s short dim-0 chunks: AdamW moments are unpadded, the prediction "
            "prices dp rank 0"
        )
        terms["optimizer"].append((why, 8 * short))
        terms["peak"].append((why, 8 * short))
    terms["optimizer"].append(
        (
            f"AdamW step counters: {n_tensors} fp32 0-d tensors, filed as optimizer state",
            4 * n_tensors,
        )
    )
    terms["activations"] += [
        (
            "token ids and targets (int64, saved by the embedding and the loss): the tracker files "
            "them as inputs",
            -16 * batch * seq,
        ),
        ("the loss (fp32 scalar), alive after forward", 4),
    ]
    terms["model_state"] = [t for k in ("params", "grads", "optimizer") for t in terms[k]]
    return terms


def compare(pred: dict, got: dict, terms: dict) -> list[dict]:
    """One row per :data:`ROWS` entry: predicted, tracker, difference, the named terms and the
    residual (the difference no term explains)."""
    tracked = {k: got["after_step"][k] for k in ("params", "grads", "optimizer", "buffers")}
    tracked["activations"] = got["after_forward"]["activations"]
    tracked["model_state"] = tracked["params"] + tracked["grads"] + tracked["optimizer"]
    tracked["peak"] = got["peak"]["total"]
    rows = []
    for k in ROWS:
        diff = int(tracked[k]) - int(pred[k])
        rows.append(
            {
                "category": k,
                "predicted": int(pred[k]),
                "tracker": int(tracked[k]),
                "difference": diff,
                "terms": [{"name": n, "bytes": int(b)} for n, b in terms[k]],
                "residual": diff - sum(int(b) for _, b in terms[k]),
            }
        )
    return rows


def crosscheck(
    model_cfg,
    dp_shard: int,
    tp: int = 1,
    precision: str = "fp32",
    batch: int = 1,
    seq: Optional[int] = None,
    sp: bool = False,
    rank: int = 0,
    strategy: str = "none",
) -> dict:
    """:func:`track_fsdp_step` beside :func:`predicted` for the same layout, strategy and shape:
    the tracker's snapshots, the prediction, and :func:`compare`'s rows (``rows``). The peak row's
    residual is what peak.predict_peak's phases leave out (peak.UNMODELLED['fsdp']: moments inside
    backward) or bound from above (the ``recompute`` phase)."""
    if dp_shard < 2:
        raise ConfigError(f"the FSDP cross-check needs dp_shard >= 2, got {dp_shard}")
    seq = int(seq or model_cfg.max_seq_len)
    lay = layout_of(dp_shard, tp, sp)
    pred = predicted(model_cfg, lay, strategy, batch, seq, precision)
    got = track_fsdp_step(
        model_cfg, dp_shard, tp, precision, batch, seq, sp, rank=rank, strategy=strategy
    )
    terms = named_terms(model_cfg, lay, batch, seq, rank)
    return {**got, "predicted": pred, "rows": compare(pred, got, terms)}

"""Parallel layouts (tensor + sequence, pipeline, context, FSDP) and what each one means for one
GPU's memory.

``estimate.layout`` (recompute_lab.config.LayoutConfig) is checked here (:func:`validate_layout`,
clear errors
naming the valid values), and this module holds the layout arithmetic that needs no model build:

- pipeline stages: which layers a rank holds (:func:`stage_layers`) and how many micro-batches its
schedule
  keeps in flight, twice: the closed forms of Narayanan et al. 2021 / Korthikanti et al. 2022
  (:func:`in_flight_chunks`, :func:`interleaved_first_stage_factor`) and a count over the action
  lists PyTorch's
  own schedules (torch.distributed.pipelining Schedule1F1B / ScheduleInterleaved1F1B) build
  (:func:`schedule_in_flight`);
- model state per rank: each parameter's tensor-parallel shard (the plan of
recompute_lab.measure.tensor_parallel),
  then FSDP2's padded dim-0 shard over ``dp_shard`` (:func:`model_state_per_rank`);
- Korthikanti's per-layer activation formulas with tensor-parallel degree t, with and without
sequence
  parallelism, for none / selective / full recomputation (:func:`korthikanti_tp_layer_bytes`).

Layer: predict (no torch).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

from recompute_lab.config import ConfigError
from recompute_lab.config.spec import as_model_config, config_key
from recompute_lab.predict import devices, theory
from recompute_lab.predict.peak import ParamTensor, local_rows, param_tensors, shard_rows


def degrees(lay) -> dict:
    return {k: int(getattr(lay, k)) for k in ("tp", "pp", "cp", "dp_shard", "dp_replicate")}


def is_active(lay) -> bool:
    """Does the layout change anything (some degree above 1)?"""
    return lay is not None and any(v != 1 for v in degrees(lay).values())


def n_gpus(lay) -> int:
    return math.prod(degrees(lay).values())


def _divisors_of_all(*values: int) -> list[int]:
    return [d for d in range(1, min(values) + 1) if all(v % d == 0 for v in values)]


def validate_layout(lay, model, seq_len: int, parallel=None) -> None:
    """Rules a layout must meet for ``model`` at ``seq_len`` (raise ConfigError naming the valid
    choices)."""
    for k, v in degrees(lay).items():
        if v is None or v < 1:
            raise ConfigError(f"estimate.layout.{k} must be a positive integer, got {v!r}")
    tp, pp, cp, v = int(lay.tp), int(lay.pp), int(lay.cp), int(lay.pp_virtual)
    if parallel is not None and str(parallel.kind) != "none" and is_active(lay):
        raise ConfigError(
            f"parallel={parallel.kind} with estimate.layout: set the data-parallel sharding with "
            "estimate.layout.dp_shard / dp_replicate instead (parallel=none)"
        )
    if tp > 1:
        if str(model.arch) != "gpt":
            raise ConfigError(
                f"estimate.layout.tp={tp}: tensor-parallel plans exist for model.arch=gpt only "
                f"(recompute_lab.model.gpt), not {model.arch}"
            )
        kv = model.n_kv_head or model.n_head
        if model.n_head % tp or kv % tp or model.d_ff % tp or model.vocab_size % tp:
            valid = _divisors_of_all(model.n_head, kv, model.d_ff, model.vocab_size)
            raise ConfigError(
                f"estimate.layout.tp={tp} must divide n_head={model.n_head}, n_kv_head={kv}, "
                f"d_ff={model.d_ff} and vocab_size={model.vocab_size}; valid tp: {valid}"
            )
        if str(model.positions) == "learned" and model.max_seq_len % tp:
            valid = _divisors_of_all(model.n_head, kv, model.d_ff, model.vocab_size,
                                     model.max_seq_len)
            raise ConfigError(
                f"estimate.layout.tp={tp} must divide the learned position table's "
                f"max_seq_len={model.max_seq_len} (its rows are split like the token table's); "
                f"valid tp: {valid}"
            )
    if seq_len % cp:
        raise ConfigError(
            f"estimate.layout.cp={cp} must divide the sequence length {seq_len}; valid cp: "
            f"{[d for d in range(1, 65) if seq_len % d == 0]}"
        )
    if tp > 1 and lay.sp and (seq_len // cp) % tp:
        raise ConfigError(
            f"sequence parallelism splits each rank's {seq_len // cp} tokens over tp={tp}: "
            f"tp must divide seq_len / cp"
        )
    if pp > model.n_layer:
        raise ConfigError(f"estimate.layout.pp={pp} exceeds model.n_layer={model.n_layer}")
    m = microbatches(lay)
    if m < 1:
        raise ConfigError(f"estimate.layout.microbatches must be a positive integer, got {m}")
    if str(lay.pp_schedule) == "interleaved":
        if v < 2 or model.n_layer % (pp * v):
            raise ConfigError(
                f"pp_schedule=interleaved needs pp_virtual >= 2 with pp x pp_virtual dividing "
                f"n_layer={model.n_layer}; valid pp_virtual for pp={pp}: "
                f"{[d for d in range(2, model.n_layer + 1) if model.n_layer % (pp * d) == 0]}"
            )
        if m % pp:
            raise ConfigError(
                f"pp_schedule=interleaved needs microbatches to be a multiple of pp={pp} "
                f"(Megatron's rule; PyTorch's rounds), got {m}"
            )
    elif v != 1:
        raise ConfigError(
            f"estimate.layout.pp_virtual={v} needs pp_schedule=interleaved (one_f_one_b: 1)"
        )
    devices.device_of(lay)  # one of gpu / device_gib / device_gb, a known preset, a sane reserve


def microbatches(lay) -> int:
    return int(lay.microbatches) if lay.microbatches is not None else int(lay.pp)


def stage_layers(n_layer: int, pp: int, virtual: int = 1) -> list[int]:
    """Blocks per pipeline stage (pp x virtual stages, stage k on rank k % pp). Uneven counts: the
    first stages
    get one more block (the embeddings sit on stage 0, the head and loss on the last)."""
    n = pp * virtual
    base, extra = divmod(n_layer, n)
    return [base + (1 if k < extra else 0) for k in range(n)]


# ---- pipeline schedules: micro-batches in flight
# ------------------------------------------------------------


def in_flight_chunks(schedule: str, p: int, m: int, rank: int, v: int = 1) -> int:
    """Forward passes (of one stage chunk each) rank ``rank`` has run and not yet run backward for,
    at most.

    1F1B (PipeDream-flush): the warm-up runs p - rank - 1 forwards, the steady state one more: min(p
    - rank, m).
    Interleaved (Megatron / PyTorch): 2(p - rank - 1) + (v - 1)p warm-up forwards of a 1/(pv) chunk,
    plus one,
    at most m x v. On rank 0 that is L (1 + (p - 1)/(pv)) layers:
    :func:`interleaved_first_stage_factor`.
    """
    if schedule == "1f1b":
        return min(p - rank, m)
    return min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v)


def interleaved_first_stage_factor(p: int, v: int) -> float:
    """Korthikanti et al. 2022 (sec. 4.2.3): the first stage of the interleaved schedule holds
    activations of
    L (1 + (p - 1)/(p v)) layers, against L for 1F1B (p micro-batches of L/p layers)."""
    return 1 + (p - 1) / (p * v)


def _pytorch_orders(schedule: str, p: int, m: int, v: int) -> dict[int, list]:
    """Per rank, the action list torch.distributed.pipelining's schedule computes (no stages, no
    processes:
    the order functions read only the sizes, given here on a namespace)."""
    from torch.distributed.pipelining import schedules as S

    if schedule == "1f1b":
        ns = SimpleNamespace(_num_stages=p, _n_microbatches=m)
        return S.Schedule1F1B._get_pipeline_order(ns)
    rounds = max(1, m // p)
    ns = SimpleNamespace(
        n_local_stages=v,
        pp_group_size=p,
        _n_microbatches=m,
        number_of_rounds=rounds,
        microbatches_per_round=m // rounds,
    )
    return {r: S.ScheduleInterleaved1F1B._calculate_single_rank_operations(ns, r) for r in range(p)}


def schedule_in_flight(
    schedule: str, p: int, m: int, v: int = 1, stage_bytes: Optional[list] = None
) -> list:
    """Per rank, the peak over PyTorch's action list of what forwards without their backward hold:
    in chunks,
    or in bytes when ``stage_bytes`` (one value per stage, stage k on rank k % p) is given."""
    from torch.distributed.pipelining.schedules import _ComputationType as C

    out = []
    for _, actions in sorted(_pytorch_orders(schedule, p, m, v).items()):
        live: dict[int, int] = {}
        peak = 0
        for a in actions:
            if a is None:
                continue
            if a.computation_type == C.FORWARD:
                live[a.stage_index] = live.get(a.stage_index, 0) + 1
            elif a.computation_type in (C.FULL_BACKWARD, C.BACKWARD_INPUT):
                live[a.stage_index] -= 1
            now = sum(n * (1 if stage_bytes is None else stage_bytes[k]) for k, n in live.items())
            peak = max(peak, now)
        out.append(peak)
    return out


# ---- model state per rank
# --------------------------------------------------------------------------------


def tp_shard_dim(name: str) -> Optional[int]:
    """The dim tensor parallelism splits parameter ``name`` along
    (recompute_lab.measure.tensor_parallel's plan), or None
    when every tp rank holds all of it. Column-parallel layers (qkv, fc, head) and the
    vocab-parallel embedding
    split dim 0 (bias too); row-parallel layers (attn.out, mlp.proj) split dim 1 and keep their bias
    whole."""
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias", "mlp.fc.weight", "mlp.fc.bias")):
        return 0
    if name.endswith(("attn.out.weight", "mlp.proj.weight")):
        return 1
    if name in ("tok_emb.weight", "pos_emb.weight", "head.weight"):
        return 0  # vocab-parallel tables (the position table's rows likewise) and the head
    return None


def tp_local_shape(p: ParamTensor, tp: int) -> tuple:
    dim = tp_shard_dim(p.name)
    if dim is None or tp == 1:
        return p.shape
    return tuple(n // tp if i == dim else n for i, n in enumerate(p.shape))


def role_of(name: str) -> str:
    """Where a module or parameter sits in the pipeline: ``first`` (embeddings: on the first stage),
    ``last`` (final norm, output head, loss: on the last stage) or ``block``. Our GPT's names and a
    Hugging Face model's (recompute_lab.model.hf: ``hf.model.embed_tokens``,
    ``hf.transformer.wte`` /
    ``wpe`` / ``drop``, ``hf.model.norm``, ``hf.transformer.ln_f``, ``hf.lm_head``) alike."""
    if name.startswith("blocks."):
        return "block"
    module = name.removesuffix(".weight").removesuffix(".bias")
    if module.startswith("hf."):
        first = "emb" in module or module.endswith((".wte", ".wpe", ".drop"))
        return "first" if first else "last"
    return "first" if module in ("tok_emb", "pos_emb", "drop") else "last"


def stage_params(cfg, lay, stage: int) -> list[ParamTensor]:
    """Parameters pipeline stage ``stage`` holds: its blocks, plus the embeddings (first stage) and
    the final
    norm and head (last stage; with tied embeddings and pp > 1 the last stage keeps its own copy of
    the matrix,
    as Megatron does)."""
    return [p for n, group in stage_groups(cfg, lay, stage) for _ in range(n) for p in group]


def stage_groups(cfg, lay, stage: int) -> list[tuple[int, list[ParamTensor]]]:
    """:func:`stage_params` as (repeats, parameters) groups: one block's parameters once per layer
    of the stage, then the embeddings and the head where the stage has them. A sum over a stage's
    parameters need not walk every layer (what_fits summed 5 million shapes so, issue 29)."""
    counts = stage_layers(cfg.n_layer, int(lay.pp), int(lay.pp_virtual))
    chunks = [k for k in range(len(counts)) if k % int(lay.pp) == stage]
    full = param_tensors(cfg, n_layer=1)
    out = [(sum(counts[k] for k in chunks), [p for p in full if role_of(p.name) == "block"])]
    last = len(counts) - 1
    if 0 in chunks:
        out.append((1, [p for p in full if role_of(p.name) == "first"]))
    if last in chunks:
        ends = [p for p in full if role_of(p.name) == "last"]
        if cfg.tie_embeddings and (0 not in chunks):
            ends.append(ParamTensor("head.weight", (cfg.vocab_size, cfg.d_model)))
        out.append((1, ends))
    return out


def model_state_per_rank(
    cfg, lay, precision: str, fp32_grad_accum: bool = False, stage: int = 0
) -> dict:
    """Model-state bytes one GPU of pipeline stage ``stage`` holds (theory.model_state_bytes' keys).

    Each parameter: its tensor-parallel local shape, then (dp_shard > 1) FSDP2's dim-0 shard, padded
    to a
    multiple of dp_shard for params and grads (FSDP2 reduce-scatters into padded shards), unpadded
    for AdamW's
    moments; bf16_master under FSDP keeps fp32 shards as its master weights
    (theory.FSDP_BF16_MASTER_...).
    dp_replicate copies the sharded state: it adds GPUs, not bytes per GPU.
    """
    tp, ds = int(lay.tp), int(lay.dp_shard)
    # cached: a function of these values alone, asked for thousands of times by the planners
    key = (config_key(as_model_config(cfg)), tp, ds, int(lay.pp), int(lay.pp_virtual))
    key += (precision, bool(fp32_grad_accum), stage)
    if key not in _STATE:
        _STATE[key] = _model_state_per_rank(cfg, lay, precision, fp32_grad_accum, stage)
    out = _STATE[key]
    return {**out, "per_param": dict(out["per_param"])}


_STATE: dict = {}


def _model_state_per_rank(cfg, lay, precision: str, fp32_grad_accum: bool, stage: int) -> dict:
    tp, ds = int(lay.tp), int(lay.dp_shard)
    groups = stage_groups(cfg, lay, stage)
    shapes = [(n, tp_local_shape(p, tp)) for n, group in groups for p in group]
    fsdp = ds > 1
    padded = sum(n * (shard_rows(s, ds) if fsdp else math.prod(s)) for n, s in shapes)
    local = sum(n * local_rows(s, ds, 0) for n, s in shapes) if fsdp else padded
    per = (
        theory.FSDP_BF16_MASTER_BYTES_PER_PARAM
        if fsdp and precision == "bf16_master"
        else theory.MODEL_STATE_BYTES_PER_PARAM[theory.model_state_key(precision, fp32_grad_accum)]
    )
    by_kind = {k: b * (local if k == "optimizer" else padded) for k, b in per.items()}
    return {
        "per_param": by_kind,
        "total": sum(by_kind.values()),
        "params_per_rank": local,
        "bytes_per_param": sum(by_kind.values()) / max(local, 1),
    }


# ---- Korthikanti et al. 2022 with tensor parallelism
# -------------------------------------------------------


def korthikanti_tp_layer_bytes(
    s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False, recompute: str = "none"
) -> float:
    """Per layer per tensor-parallel rank, 16-bit with dropout (Korthikanti et al. 2022, eqs. 2-4
    and sec. 5):

    none       sbh (10 + 24/t + 5as/(ht))   (norms, their Linear inputs and two dropout masks:
               10sbh, replicated)
    none + sp  sbh/t (34 + 5as/h)
    selective  the 5as/h attention term dropped (its core recomputed)
    full       the layer input only: 2sbh, or 2sbh/t with sequence parallelism
    """
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    att = 0 if recompute == "selective" else 5 * a * s / h
    return sbh / t * (34 + att) if sp else sbh * (10 + 24 / t + att / t)

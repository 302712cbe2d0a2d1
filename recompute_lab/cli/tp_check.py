"""A real tensor-parallel run (processes, gloo, CPU) of the plan that estimate measures on the meta
device.

    torchrun --standalone --nproc_per_node=2 -m recompute_lab.tp_check OUT_DIR [--sp 0|1]
    [--strategy NAME]

Each rank builds the same small Llama-like GPT on the CPU (fp32, random weights), applies
recompute_lab.measure.tensor_parallel's plan on a 1-D mesh of all ranks, runs one forward under
recompute_lab.measure.memory.saved_tensors (CPU kernels, real storages) and writes
OUT_DIR/rank{R}.json: its saved bytes
by module and its local parameter elements and bytes. tests/integration/test_tp_check.py compares
each rank with the meta
estimate of the same layout (:func:`meta_estimate`).

Layer: cli.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from recompute_lab.config import ModelConfig

# Llama-like and tiny: rmsnorm, swiglu, rope, GQA 4/2 heads; fp32 so that CPU kernels need no bf16
# paths.
MODEL = dict(
    n_layer=2,
    d_model=64,
    n_head=4,
    n_kv_head=2,
    d_ff=128,
    vocab_size=128,
    max_seq_len=32,
    norm="rmsnorm",
    mlp="swiglu",
    positions="rope",
    bias=False,
    tie_embeddings=False,
)
BATCH, SEQ = 2, 32


def model_cfg():
    return OmegaConf.structured(ModelConfig(**MODEL))


def _record(model, saved: dict) -> dict:
    from recompute_lab.measure.tensor_parallel import local_param_numel

    return {
        "saved_total": saved["total"],
        "by_module": saved["by_module"],
        **local_param_numel(model),
    }


def meta_estimate(tp: int, sp: bool, strategy: str) -> dict:
    """Rank 0 of the same layout on the meta device (fake process group), with CPU kernels'
    saves."""
    from recompute_lab.measure import tensor_parallel as T

    with T.fake_world(tp):
        model, _ = T.build_parallel(model_cfg(), tp, sp, {"name": strategy}, dtype=torch.float32)
        return _record(model, T.measure_rank(model, BATCH, SEQ, "cpu"))


def run_rank(out: Path, sp: bool, strategy: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor.parallel import loss_parallel

    from recompute_lab.measure import tensor_parallel as T
    from recompute_lab.measure.memory import saved_tensors
    from recompute_lab.model.gpt import build_model
    from recompute_lab.strategies import apply_strategy

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)  # every rank: the same replicated weights and batch
        model = build_model(model_cfg(), "cpu", torch.float32)
        T.parallelize(model, T.mesh_of({"tp": world}), sp)
        apply_strategy(model, {"name": strategy})
        model.train()
        idx = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ))
        with loss_parallel():
            saved = saved_tensors(model, lambda: model(idx, idx.clone()))
            saved[
                "output"
            ].backward()  # the plan trains: a backward through the sharded graph must run
        del saved["output"]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(_record(model, saved)))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--sp", type=int, default=1)
    ap.add_argument("--strategy", default="none")
    args = ap.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit(
            "run under torchrun: torchrun --standalone --nproc_per_node=2 -m "
            "recompute_lab.tp_check OUT"
        )
    torch.set_num_threads(1)
    run_rank(args.out, bool(args.sp), args.strategy)


if __name__ == "__main__":
    main()

"""Data parallelism under torchrun: process group, per-rank device and data slice, DDP / FSDP2
wrapping.

``torchrun --nproc_per_node=N -m recompute_lab.train parallel=fsdp ...`` starts N copies of the CLI;
each reads
RANK / WORLD_SIZE / LOCAL_RANK from its environment (torchrun's env:// rendezvous). A SLURM job
started by
Hydra's submitit launcher with several tasks gets the same variables from submitit's JobEnvironment.

Conventions:
  - ``data.batch_size`` is the micro-batch of ONE rank; the global batch is batch_size x WORLD_SIZE.
  Every rank
    draws the same global batch (data is a pure function of seed, step, micro-batch) and keeps rows
    [rank * B, (rank + 1) * B), so a 2-rank run with B rows each trains on exactly the batches of a
    one-process
    run with 2B rows, and (gradients being averaged over ranks) follows the same loss curve.
  - Rank 0 owns the Hydra output dir, results.json and the only W&B run. Other ranks point Hydra at
  a private
    temporary dir that is deleted at exit (:func:`prepare_argv`); ``${now:}`` differs per process,
    so the
    dirs could not be shared by name anyway (hydra#2070).
  - Wrapping happens after the recomputation strategy (torchtitan: AC, then compile, then FSDP):
  FSDP2's
    ``fully_shard`` on every block, then on the root (embeddings, final norm, head).
  - bf16_master under fsdp: the model is kept in fp32 and sharded;
  MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32) gathers bf16 weights for compute and reduce-scatters gradients into fp32
    shards, and a
    plain AdamW steps the fp32 shards. The sharded fp32 params are the master weights: 4 + 4 + 8 =
    16 B/param
    over the ranks (theory.model_state_bytes_sharded), with no separate bf16 parameter copy at rest.

Layer: run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from recompute_lab.config import ConfigError, LoggerKind
from recompute_lab.config.spec import RunSpec
from recompute_lab.model.data import Batches
from recompute_lab.model.precision import PrecisionPolicy
from recompute_lab.run.ranks import env_rank, env_world_size, prepare_argv  # noqa: F401


def _submitit_env() -> None:
    """Inside a multi-task submitit job (SLURM or local), export RANK, WORLD_SIZE, MASTER_ADDR...
    for env://."""
    if "RANK" in os.environ or not (
        os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    ):
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except (ImportError, RuntimeError):  # not a submitit job: a plain single process
        pass


@dataclass
class DistContext:
    """This process's place in a data-parallel run (rank 0 of 1 when parallel=none)."""

    kind: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    started_group: bool = False
    reshard_after_forward: bool = True  # fsdp only
    mp_policy: object = None  # FSDP MixedPrecisionPolicy, when precision asks for one
    notes: list = field(default_factory=list)

    @classmethod
    def from_env(cls, cfg: RunSpec) -> "DistContext":
        """Read (not join) the launcher's environment: collectives start in :meth:`setup`."""
        p = getattr(
            cfg, "parallel", None
        )  # a RunSpec, or the composed config of a run not yet validated
        kind = str(getattr(p, "kind", None) or "none")
        if kind != "none":
            _submitit_env()
        return cls(
            kind=kind,
            rank=env_rank(),
            world_size=env_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            reshard_after_forward=bool(getattr(p, "reshard_after_forward", True)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    # -- process group
    # -----------------------------------------------------------------------------------------
    def setup(self, cfg: RunSpec, device: torch.device) -> torch.device:
        """Join the process group; return this rank's device (cuda:LOCAL_RANK on GPUs)."""
        p = cfg.parallel
        if not self.enabled:
            if self.world_size > 1:
                raise ConfigError(
                    f"started by a launcher with WORLD_SIZE={self.world_size} but parallel=none; "
                    "valid with several processes: parallel=ddp, parallel=fsdp"
                )
            return device
        if p.dp_size is not None and p.dp_size != self.world_size:
            raise ConfigError(
                f"parallel.dp_size={p.dp_size} but WORLD_SIZE={self.world_size}: set "
                "parallel.dp_size=null under torchrun (the world size is used)"
            )
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        backend = (
            str(p.backend) if p.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        )
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("parallel.backend=nccl needs CUDA; valid on CPU: auto, gloo")
        if self.world_size > 1 or "MASTER_ADDR" in os.environ:
            if not dist.is_initialized():
                dist.init_process_group(
                    backend, device_id=device if device.type == "cuda" else None
                )
                self.started_group = True
        else:  # parallel=ddp|fsdp in one plain process: a 1-rank group on an in-memory store
            self._single_rank_group(backend, device)
        self.backend = backend
        return device

    def rank_log(self, run_dir: Path) -> Optional[Path]:
        """On ranks other than 0, a log file of their own in rank 0's output dir
        (``rank{N}.log``, with the handlers' format): their Hydra dir is a temporary one deleted at
        exit (:func:`prepare_argv`). Rank 0's dir comes from rank 0 (its ``${now:}`` differs from
        ours). Returns the file (None on rank 0 or without a process group)."""
        if self.world_size <= 1 or not dist.is_initialized():
            return None
        shared = [str(run_dir) if self.is_main else None]
        dist.broadcast_object_list(shared, src=0)
        if self.is_main:
            return None
        path = Path(shared[0]) / f"rank{self.rank}.log"
        handler = logging.FileHandler(path)
        root = logging.getLogger()
        handler.setFormatter(
            next((h.formatter for h in root.handlers if h.formatter is not None), None)
        )
        root.addHandler(handler)
        logging.getLogger(__name__).info("rank %d logs to %s", self.rank, path)
        return path

    def _single_rank_group(self, backend: str, device: torch.device) -> None:
        if dist.is_initialized():
            return
        store = dist.HashStore()
        dist.init_process_group(
            backend,
            store=store,
            rank=0,
            world_size=1,
            device_id=device if device.type == "cuda" else None,
        )
        self.started_group = True

    def close(self) -> None:
        if self.started_group and dist.is_initialized():
            dist.destroy_process_group()
            self.started_group = False

    # -- precision, data, model
    # --------------------------------------------------------------------------------
    def adapt_precision(self, policy: PrecisionPolicy) -> PrecisionPolicy:
        """Under fsdp, bf16_master becomes fp32 sharded params + FSDP mixed precision (see module
        docstring)."""
        if self.kind != "fsdp" or not policy.master_weights:
            return policy
        from torch.distributed.fsdp import MixedPrecisionPolicy

        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=policy.param_dtype, reduce_dtype=torch.float32
        )
        self.notes.append(
            "bf16_master under fsdp: fp32 sharded params are the master weights; FSDP gathers "
            "bf16 copies for compute and reduce-scatters grads in fp32"
        )
        return PrecisionPolicy(
            policy.name, torch.float32, autocast_dtype=None, master_weights=False
        )

    def batches(self, data_cfg: RunSpec, vocab_size: int) -> "Batches | RankBatches":
        if self.world_size == 1:
            return Batches(data_cfg, vocab_size)
        global_cfg = dataclasses.replace(data_cfg, batch_size=data_cfg.batch_size * self.world_size)
        return RankBatches(Batches(global_cfg, vocab_size), self.rank, data_cfg.batch_size)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP or FSDP2 around a model whose recomputation wrappers are already in place."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            on_cuda = next(model.parameters()).device.type == "cuda"
            # Gradients as views of DDP's all-reduce buckets: no second copy of the grads (4
            # B/param).
            return DDP(
                model,
                device_ids=[self.local_rank] if on_cuda else None,
                gradient_as_bucket_view=True,
            )
        if self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            kwargs = {"mp_policy": self.mp_policy} if self.mp_policy is not None else {}
            for block in model.blocks:
                fully_shard(block, reshard_after_forward=self.reshard_after_forward, **kwargs)
            fully_shard(model, reshard_after_forward=self.reshard_after_forward, **kwargs)
        return model

    # -- per-step and end-of-run collectives
    # ------------------------------------------------------------------
    def reduce_step(self, loss_sum: Tensor, stop: bool) -> tuple[float, bool]:
        """Mean loss over the ranks and whether any rank was asked to stop (one all-reduce per
        step)."""
        if not self.enabled or not dist.is_initialized():
            return loss_sum.item(), stop
        buf = torch.stack(
            [loss_sum.detach().float(), torch.tensor(float(stop), device=loss_sum.device)]
        )
        dist.all_reduce(buf)
        return buf[0].item() / self.world_size, bool(buf[1].item() > 0)

    def gather(self, obj) -> Optional[list]:
        """Every rank's ``obj`` on rank 0 (None elsewhere); [obj] without a process group."""
        if not self.enabled or not dist.is_initialized():
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def report(self, cfg: RunSpec, results: dict) -> None:
        """Gather per-rank model-state figures into results["parallel"] (all ranks must call it)."""
        mem = results["memory"]
        ms = mem["model_state_bytes"]
        tok_s = results["time"].get("tokens_per_s")
        # Activation and peak bytes are this rank's too (its micro-batch; the probe ran its step on
        # the wrapped
        # model), where a probe has measured them; the predicted peak is this rank's
        # (recompute_lab.predict.peak).
        per_rank = self.gather(
            {
                "rank": self.rank,
                "measured": ms.get("measured"),
                "per_param": ms.get("per_param"),
                "activation_bytes": mem["activation_bytes"].get("measured"),
                "peak_bytes": mem["peak_bytes"].get("measured"),
                "peak_bytes_predicted": mem["peak_bytes"].get("predicted"),
            }
        )
        results["parallel"] = {
            "kind": self.kind,
            "world_size": self.world_size,
            "backend": self.backend,
            "batch_size_per_rank": cfg.data.batch_size,
            "global_batch_size": cfg.data.batch_size * self.world_size,
            "reshard_after_forward": self.reshard_after_forward if self.kind == "fsdp" else None,
            "per_rank": per_rank,
            "notes": self.notes,
            "tokens_per_s_global": tok_s * self.world_size if tok_s else None,
        }


class RankBatches:
    """This rank's rows of the global batch: (idx, targets) of shape (B, T), rows [rank*B,
    (rank+1)*B)."""

    def __init__(self, global_batches: Batches, rank: int, per_rank: int):
        self.global_batches, self.lo, self.hi = (
            global_batches,
            rank * per_rank,
            (rank + 1) * per_rank,
        )

    def get(self, step: int, micro: int = 0) -> tuple[Tensor, Tensor]:
        idx, targets = self.global_batches.get(step, micro)  # (world*B, T) each
        # Copies: a row slice would keep the whole global batch alive on every rank.
        return idx[self.lo : self.hi].clone(), targets[self.lo : self.hi].clone()


def logger_cfg(spec: RunSpec, ctx: DistContext) -> RunSpec:
    """The spec the W&B logger sees: unchanged on rank 0, logging off elsewhere (one W&B run per
    job)."""
    return spec if ctx.is_main else spec.replace(logger__kind=LoggerKind.none)

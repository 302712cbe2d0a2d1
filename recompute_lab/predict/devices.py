"""Cards and headroom: how much of a GPU a training step may use, and whether a predicted step fits.

Layer: predict (no torch). A card's memory is what
``torch.cuda.get_device_properties(i).total_memory``
reports on it (the driver's total, below the marketed figure: HBM the driver and ECC keep never
reaches a process). Not all of that is the allocator's to give: a step "fits" when its predicted
peak, plus a reserve, stays within the card's total. The reserve (:class:`Reserve`) has three parts:

  CUDA context        device memory a process holds outside PyTorch's caching allocator: the
                      context, the loaded kernel images, cuBLAS / cuDNN handles and workspaces;
                      measured per card by ``experiments/gpu_check.py`` (``torch.cuda.mem_get_info``
                      total minus free, minus ``memory_reserved``, after its training runs)
  communication       NCCL's buffers: one communicator per parallel dimension with more than one
                      rank (tp, pp, cp, dp_shard, dp_replicate), each ``comm_gib`` (NCCL_BUFFSIZE 4
                      MiB per channel, per peer connection, for its send and receive sides)
  fragmentation       the caching allocator's rounding and unusable free blocks: a fraction of the
                      predicted peak (``memory_reserved`` over ``memory_allocated`` at the peak,
                      measured by gpu_check)

Each part is a knob (``estimate.layout.*`` and the defaults below, which say where they come from);
none of them is a property of the model. Tables where cards are concerned are in GiB (2^30 B), the
unit ``nvidia-smi`` and torch's out-of-memory messages use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from recompute_lab.config import ConfigError

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class Card:
    """One GPU model: the bytes torch reports as its total, and where that figure comes from."""

    name: str
    total_bytes: int
    source: str

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB


# The total torch reports per card. A repr's ``total_memory=NMB`` is MiB (bytes // 2^20); where
# reports differ (driver, ECC) the smallest credible one is kept, since a planner must not promise
# memory a card of that name may lack.
CARDS: dict[str, Card] = {
    c.name: c
    for c in (
        Card(
            "a100_40gb",
            42_285_268_992,
            "deviceQuery on A100-PCIE-40GB, driver 12.4 (40,326 MiB; torch 1.9 prints the same); "
            "A100-SXM4-40GB reports the same bytes at the same driver (42,298,834,944 B at 12.2, "
            "github.com/bottlerocket-os/bottlerocket/pull/3873)",
        ),
        Card(
            "a100_80gb",
            84_974_239_744,
            "deviceQuery on A100 80GB PCIe, driver 12.4 (81,038 MiB); SXM4 at driver 12.2: "
            "81,051 MiB",
        ),
        Card(
            "h100_80gb",
            85_017_755_648,
            "deviceQuery on H100 80GB HBM3 (SXM5), driver 13.0 (81,079 MiB); torch's repr shows "
            "81,082 to 81,090 MiB on other drivers",
        ),
        Card(
            "h200",
            143_156 * MiB,
            "torch.cuda.get_device_properties repr on H200 (total_memory=143156MB); out-of-memory "
            "messages say 139.80 GiB",
        ),
        Card(
            "b200",
            182_631 * MiB,
            "torch.cuda.get_device_properties repr on B200 (total_memory=182631MB); out-of-memory "
            "messages say 178.35 GiB",
        ),
        Card(
            "mi300x",
            196_592 * MiB,
            "torch (ROCm 6.2.4) repr on MI300X (total_memory=196592MB), "
            "github.com/ROCm/ROCm/issues/4203",
        ),
    )
}


def card(name: str) -> Card:
    """The preset ``name`` (an error naming the valid presets otherwise)."""
    key = str(name).lower()
    if key not in CARDS:
        raise ConfigError(
            f"unknown GPU preset {name!r}; valid: {', '.join(sorted(CARDS))} (or give the memory "
            "in bytes with estimate.layout.device_gib / device_gb)"
        )
    return CARDS[key]


# Defaults of the reserve (see the module docstring for what each part is and how it is measured).
# Context: with CUDA's lazy module loading (default since CUDA 11.7 in PyTorch builds) reports of
# 274 to 426 MiB per process (pytorch/pytorch PR 86509); 0.75 GiB leaves room for cuBLAS / cuDNN
# workspaces. Communication: users measure about 544 to 688 MB of device memory per NCCL
# communicator (NVIDIA/nccl issue 964); 0.5 GiB each. Fragmentation: the caching allocator's
# reserved-over-allocated is reported at about 15% on average for LLM fine-tuning (GMLake,
# ASPLOS 2024) and 5% in lighter loads; 10% by default. gpu_check measures the first and last on
# the card it runs on.
CONTEXT_GIB = 0.75
COMM_GIB_PER_GROUP = 0.5
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class Reserve:
    """What a step may not use of a card: context + communication buffers + a fraction of its
    peak."""

    context_bytes: int = int(CONTEXT_GIB * GiB)
    comm_bytes_per_group: int = int(COMM_GIB_PER_GROUP * GiB)
    fragmentation: float = FRAGMENTATION

    def __post_init__(self) -> None:
        if self.context_bytes < 0 or self.comm_bytes_per_group < 0:
            raise ConfigError("the reserve's context and communication bytes must be >= 0")
        if not 0 <= self.fragmentation < 1:
            raise ConfigError(
                f"the reserve's fragmentation is a fraction of the peak in [0, 1), got "
                f"{self.fragmentation}"
            )

    def parts(self, peak_bytes: int, groups: int) -> dict:
        """The reserve's bytes by part for a step peaking at ``peak_bytes`` on a rank that belongs
        to ``groups`` communicators."""
        parts = {
            "cuda_context": self.context_bytes,
            "communication": groups * self.comm_bytes_per_group,
            "fragmentation": math.ceil(self.fragmentation * peak_bytes),
        }
        return {**parts, "total": sum(parts.values())}


@dataclass(frozen=True)
class Device:
    """The memory one GPU offers a step: a card's total (a preset or given bytes) and a reserve."""

    total_bytes: int
    name: str
    reserve: Reserve = Reserve()
    source: str = ""

    def fit(self, peak_bytes: int, groups: int) -> dict:
        """Whether a step peaking at ``peak_bytes`` fits after the reserve, and by how much (margin
        < 0: short by that much)."""
        res = self.reserve.parts(peak_bytes, groups)
        margin = self.total_bytes - res["total"] - peak_bytes
        return {
            "device": self.name,
            "device_bytes": self.total_bytes,
            "peak_bytes": peak_bytes,
            "reserve": res,
            "margin_bytes": margin,
            "fits": margin >= 0,
            "used_fraction": (peak_bytes + res["total"]) / self.total_bytes,
        }

    def budget(self, groups: int) -> int:
        """The largest peak that fits (solves peak + reserve(peak) <= total)."""
        fixed = self.reserve.context_bytes + groups * self.reserve.comm_bytes_per_group
        best = math.floor((self.total_bytes - fixed) / (1 + self.reserve.fragmentation))
        while best > 0 and not self.fit(best, groups)["fits"]:  # ceil in parts(): step down
            best -= 1
        return max(best, 0)


def communicators(lay) -> int:
    """NCCL communicators one rank of layout ``lay`` belongs to: one per dimension above 1."""
    if lay is None:
        return 0
    return sum(int(getattr(lay, k)) > 1 for k in ("tp", "pp", "cp", "dp_shard", "dp_replicate"))


def device_of(lay) -> Optional[Device]:
    """The device ``estimate.layout`` describes (``gpu`` preset, ``device_gib`` or ``device_gb``,
    at most one) with its reserve knobs; None when none is given."""
    if lay is None:
        return None
    gpu = getattr(lay, "gpu", None)
    gib = getattr(lay, "device_gib", None)
    gb = getattr(lay, "device_gb", None)
    given = [k for k, v in (("gpu", gpu), ("device_gib", gib), ("device_gb", gb)) if v is not None]
    if len(given) > 1:
        raise ConfigError(
            f"estimate.layout: set one of gpu, device_gib and device_gb, not {' and '.join(given)}"
        )
    for key, value in (("device_gib", gib), ("device_gb", gb)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ConfigError(f"estimate.layout.{key} must be a positive number, got {value!r}")
    reserve = Reserve(
        context_bytes=int(float(_knob(lay, "reserve_context_gib", CONTEXT_GIB)) * GiB),
        comm_bytes_per_group=int(float(_knob(lay, "reserve_comm_gib", COMM_GIB_PER_GROUP)) * GiB),
        fragmentation=float(_knob(lay, "reserve_fragmentation", FRAGMENTATION)),
    )
    if gpu is not None:
        c = card(gpu)
        return Device(c.total_bytes, c.name, reserve, c.source)
    if gib is not None:
        return Device(int(gib * GiB), f"{gib:g} GiB", reserve, "estimate.layout.device_gib")
    if gb is not None:
        return Device(int(gb * 1e9), f"{gb:g} GB", reserve, "estimate.layout.device_gb (1e9 B)")
    return None


def _knob(lay, key: str, default):
    value = getattr(lay, key, None)
    return default if value is None else value

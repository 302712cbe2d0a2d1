"""Peak rates of the hardware a run divides by: datasheet FLOP/s for known GPUs, measured GEMM rate and copy
bandwidth elsewhere. A leaf module (imports no other project module).

MFU / HFU (recompute_lab.flops) divide achieved FLOP/s by ``peak_flops``; the budget planner's ``objective=time``
roofline (recompute_lab.recompute.budget) uses ``roofline_rates``.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Optional

import torch

# Dense peak rates in FLOP/s from the vendors' datasheets (no sparsity). fp32 is plain FP32 (not TF32).
#  A100 SXM 80GB: 312 TFLOP/s BF16 tensor core, 19.5 TFLOP/s FP32 (NVIDIA A100 datasheet).
#  H100 SXM: 989 TFLOP/s BF16 dense (1979 with sparsity), 67 TFLOP/s FP32 (NVIDIA H100 datasheet).
#  H200 SXM: same compute as H100 SXM, 989 / 67 (NVIDIA H200 datasheet).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
}
# Roofline rates on the meta device (no hardware to measure): H100 SXM datasheet (dense) and HBM3 bandwidth.
META_RATES = {"flops": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}, "bytes_per_s": 3.35e12}


def best_time(fn: Callable[[], object], device_type: str, reps: int) -> float:
    """The fastest of ``reps`` calls of ``fn`` in seconds (synchronised on CUDA): the least disturbed one."""
    best = float("inf")
    for _ in range(reps):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(device_type: str = "cpu", dtype_name: str = "float32", n: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of an n x n GEMM on this machine (cached per process): the CPU's practical peak for MFU."""
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, dtype=dtype, device=device_type)
    bm = torch.randn(n, n, dtype=dtype, device=device_type)
    a @ bm  # warm up (thread pool, caches)
    return 2 * n ** 3 / best_time(lambda: a @ bm, device_type, reps)


def measured_copy_bandwidth(device: torch.device, nbytes: int = 64 * 2 ** 20, reps: int = 5) -> float:
    """Bytes read + written per second by one large tensor copy on ``device``."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_time(lambda: dst.copy_(src), device.type, reps)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[Optional[float], str]:
    """(peak FLOP/s, where it comes from) for MFU: the datasheet for known GPUs, a GEMM microbenchmark on CPU."""
    dname = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for key, rates in PEAK_FLOPS.items():
            if key in gpu and dname in rates:
                return rates[dname], f"datasheet {key} {dname}"
        return None, f"no datasheet peak for {gpu} {dname}"
    return measured_matmul_peak("cpu", dname), f"measured {dname} 1024^3 GEMM on this CPU"


def roofline_rates(device: torch.device, dtype: torch.dtype) -> dict:
    """Peak FLOP/s and memory bandwidth: measured here (GEMM, copy); the H100 datasheet on the meta device."""
    if device.type == "meta":
        return {"flops": META_RATES["flops"].get(dtype, 67e12), "bytes_per_s": META_RATES["bytes_per_s"],
                "source": "H100 SXM datasheet (meta device)"}
    peak, source = peak_flops(device, dtype)
    return {"flops": peak or 67e12, "bytes_per_s": measured_copy_bandwidth(device),
            "source": f"{source}; measured copy"}


def device_memory_bytes(device: torch.device) -> tuple[Optional[int], str]:
    """(bytes this process may use on ``device``, where the figure comes from); None when unknown.

    CUDA: the device's total memory. CPU: physical RAM, lowered by a cgroup memory limit (containers, SLURM)
    and by the address-space limit (``ulimit -v``) when either is smaller.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} total"
    if device.type != "cpu":
        return None, f"no capacity known for {device.type}"
    found: list[tuple[int, str]] = []
    try:
        found.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2 ** 60:  # "max" or a huge sentinel: no limit
            found.append((int(text), f"cgroup limit ({path})"))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            found.append((soft, "address-space limit (ulimit -v)"))
    except (ImportError, ValueError, OSError):
        pass
    return min(found) if found else (None, "unknown")

"""Peak rates of the hardware a run divides by: datasheet FLOP/s for known GPUs, measured GEMM rate
and copy
bandwidth elsewhere. A leaf module (imports no other project module).

MFU / HFU (recompute_lab.measure.flops) divide achieved FLOP/s by ``peak_flops``; the budget
planner's ``objective=time``
roofline (recompute_lab.strategies.budget) uses ``roofline_rates``.

The CPU's GEMM rate is measured once per machine and cached on disk, keyed by CPU model, torch
version, thread
count and dtype (``cpu_peak``): re-measuring it in every run gave 43 and 89 GFLOP/s within one
sweep, so MFU was
not comparable between runs. The cache lives in ``$RECOMPUTE_LAB_CACHE_DIR``, else
``$XDG_CACHE_HOME/recompute_lab``,
else ``~/.cache/recompute_lab``; ``python -m recompute_lab.measure.hardware [--refresh]`` shows
(re-measures) it.

Layer: measure, primitives (importable from every layer above config, predict and model).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from recompute_lab.record.provenance import git_info

# Dense peak rates in FLOP/s from the vendors' datasheets (no sparsity). fp32 is plain FP32 (not
# TF32).
#  A100 SXM 80GB: 312 TFLOP/s BF16 tensor core, 19.5 TFLOP/s FP32 (NVIDIA A100 datasheet).
#  H100 SXM: 989 TFLOP/s BF16 dense (1979 with sparsity), 67 TFLOP/s FP32 (NVIDIA H100 datasheet).
#  H200 SXM: same compute as H100 SXM, 989 / 67 (NVIDIA H200 datasheet).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
}
# Roofline rates on the meta device (no hardware to measure): H100 SXM datasheet (dense) and HBM3
# bandwidth.
META_RATES = {
    "flops": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "bytes_per_s": 3.35e12,
}


def best_time(fn: Callable[[], object], device_type: str, reps: int) -> float:
    """The fastest of ``reps`` calls of ``fn`` in seconds (synchronised on CUDA): the least
    disturbed one."""
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


def step_time_calibration(
    device: torch.device,
    dtype: torch.dtype,
    gemm: tuple[int, int, int],
    attention: tuple[int, int, int, int],
    reps: int = 20,
) -> dict:
    """The rates recompute_lab.predict.step_time needs, measured on ``device`` at a model's shapes
    (its Rates and Efficiency come from them through step_time.calibrated):

      matmul_flops_per_s      an (m, k) x (k, n) GEMM in ``dtype``, best time less one kernel's
                              overhead
      attention_flops_per_s   causal scaled_dot_product_attention at (b, h, s, hd), counted as
                              the causal half of 4 b s^2 h hd
      copy_bytes_per_s        a 64 MiB copy, bytes read + written
      op_overhead_s           a chain of K one-element multiplies with autograd, forward and
                              backward, over its 3K kernels (one forward, two backward)
      region_overhead_s       the same chain with every multiply in a non-reentrant checkpoint
                              (RNG state preserved), less the plain chain, per link, less a kernel
      sac_op_overhead_s       a chain of K GELUs in one checkpoint under an op-SAC policy (every
                              op recomputed), less the chain in one plain checkpoint, per link:
                              what the policy's dispatch mode costs per op (forward and replay)
      remat_op_overhead_s     the GELU chain in one torch_remat checkpoint, less the plain
                              checkpoint, per link
      remat_region_overhead_s the GELU chain in one torch_remat checkpoint with every GELU a named
                              (recomputed) torch_remat region, less the same without regions, per
                              link
      remat_saved_region_overhead_s  the same with every region saved (its output persisted for
                              the next, as recompute_lab.strategies.wrap does), per link
      host_bytes_per_s        CUDA only: a 64 MiB copy to pinned host memory (offload's link)
    """
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from torch.utils.checkpoint import checkpoint

    kind = device.type
    x = torch.ones(1, device=device, requires_grad=True)
    links = 200

    def chain(wrap=None):
        def run():
            y = x
            for _ in range(links):
                y = wrap(y) if wrap else y * 1.0001
            y.sum().backward()

        return run

    def region(y):
        return checkpoint(lambda t: t * 1.0001, y, use_reentrant=False, preserve_rng_state=True)

    chain()()  # warm up
    plain = best_time(chain(), kind, reps)
    overhead = plain / (3 * links)
    chain(region)()
    region_s = max((best_time(chain(region), kind, reps) - plain) / links - overhead, 0.0)
    mech = _mechanism_overheads(x, links, kind, reps)
    m, k, n = gemm
    a = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(k, n, dtype=dtype, device=device)
    a @ w
    t_mm = max(best_time(lambda: a @ w, kind, reps) - overhead, 1e-12)
    b, h, s, hd = attention
    q = torch.randn(b, h, s, hd, dtype=dtype, device=device)
    sdpa(q, q, q, is_causal=True)
    t_at = max(best_time(lambda: sdpa(q, q, q, is_causal=True), kind, reps) - overhead, 1e-12)
    return {
        "matmul_flops_per_s": 2 * m * k * n / t_mm,
        "attention_flops_per_s": 0.5 * 4 * b * s * s * h * hd / t_at,
        "copy_bytes_per_s": measured_copy_bandwidth(device),
        "op_overhead_s": overhead,
        "region_overhead_s": region_s,
        **mech,
        **({"host_bytes_per_s": host_copy_bandwidth(device)} if kind == "cuda" else {}),
    }


def host_copy_bandwidth(device: torch.device, nbytes: int = 64 << 20, reps: int = 5) -> float:
    """Bytes/s of a device-to-pinned-host copy (one way): what offloading a saved tensor costs
    (torch.autograd.graph.save_on_cpu copies into pinned memory)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst.copy_(src)
    return nbytes / best_time(lambda: dst.copy_(src), device.type, reps)


def _mechanism_overheads(x: torch.Tensor, links: int, kind: str, reps: int) -> dict:
    """Per-op costs of op-SAC's policy mode and torch_remat (step_time_calibration's docstring):
    a chain of ``links`` one-element multiplies inside one region each way, forward + backward."""
    import torch_remat as remat
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        checkpoint,
        create_selective_checkpoint_contexts,
    )

    # GELU links: a pointwise op that saves its input, as most of a block's ops do (a policy mode
    # or torch_remat costs more per op that saves a tensor: 40 against 24 us here for op-SAC)
    gelu = torch.nn.functional.gelu

    def body(t):
        for _ in range(links):
            t = gelu(t)
        return t

    named = [remat.region(gelu, f"link{i}", recompute=True) for i in range(links)]
    kept = [remat.region(gelu, f"kept{i}", recompute=False) for i in range(links)]

    def chain_of(regions, persist=False):
        def run(t):
            for f in regions:
                t = f(t)
                if persist:  # a saved region's output read by the next: persisted, as ours do
                    remat.recompute_needs_tensor(t)
            return t

        return run

    def recompute_all(ctx, func, *args, **kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE

    def sac_context():
        return create_selective_checkpoint_contexts(recompute_all)

    runs = {
        "plain": lambda: checkpoint(body, x, use_reentrant=False),
        "sac": lambda: checkpoint(body, x, use_reentrant=False, context_fn=sac_context),
        "remat": lambda: remat.checkpoint(region_name="calibration")(body)(x),
        "named": lambda: remat.checkpoint(region_name="calibration")(chain_of(named))(x),
        "kept": lambda: remat.checkpoint(region_name="calibration")(chain_of(kept, True))(x),
    }
    best = {}
    for name, fn in runs.items():
        fn().sum().backward()  # warm up

        def step(fn=fn):
            fn().sum().backward()

        best[name] = best_time(step, kind, reps)
    return {
        "sac_op_overhead_s": max((best["sac"] - best["plain"]) / links, 0.0),
        "remat_op_overhead_s": max((best["remat"] - best["plain"]) / links, 0.0),
        "remat_region_overhead_s": max((best["named"] - best["remat"]) / links, 0.0),
        "remat_saved_region_overhead_s": max((best["kept"] - best["remat"]) / links, 0.0),
    }


def gemm_rate(
    device_type: str = "cpu", dtype_name: str = "float32", n: int = 1024, reps: int = 5
) -> float:
    """FLOP/s of the fastest of ``reps`` n x n GEMMs (after one warm-up), measured now."""
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, dtype=dtype, device=device_type)
    bm = torch.randn(n, n, dtype=dtype, device=device_type)
    a @ bm  # warm up (thread pool, caches)
    return 2 * n**3 / best_time(lambda: a @ bm, device_type, reps)


CACHE_ENV = "RECOMPUTE_LAB_CACHE_DIR"
# The peak is the best of several square GEMM sizes, each the fastest of its repeats: a single
# 1024^3 GEMM timed while other processes held the cores was cached at 15 GFLOP/s on a core that
# reaches 90, and small in-cache GEMMs then ran "above peak" (MFU 144% on tiny).
# A size is measured only while the previous one ran a GEMM in under CPU_PEAK_GROW_S: a dtype
# without a fast path (bf16 GEMMs here: 2.5 GFLOP/s, 0.85 s per 1024^3 GEMM) has its rate by 512
# and took 28 s to measure at 1024 (every bf16 test session and every user's first bf16 run).
CPU_PEAK_GEMMS, CPU_PEAK_REPS, CPU_PEAK_GROW_S = (256, 512, 1024), 10, 0.05
# in the cache key: other sizes or another rule, a new key
CPU_PEAK_GEMM = ",".join(str(n) for n in CPU_PEAK_GEMMS) + f";grow<{CPU_PEAK_GROW_S}s"


def cache_dir() -> Path:
    """Where per-machine measurements are kept (never inside the repository)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
        / "recompute_lab"
    )


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_peak_key(dtype_name: str) -> dict:
    """What a cached CPU peak is valid for."""
    return {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "gemm": CPU_PEAK_GEMM,
    }


def cpu_peak_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu_peak_{key['dtype']}_{key['threads']}t_{digest}.json"


_CPU_PEAKS: dict[str, dict] = {}  # path -> record, so a process reads the file once


def cpu_gemm_peak(dtype_name: str) -> float:
    """The best GEMM rate over CPU_PEAK_GEMMS, growing the size only while a GEMM of the last one
    took under CPU_PEAK_GROW_S (see above)."""
    best = 0.0
    for n in CPU_PEAK_GEMMS:
        rate = gemm_rate("cpu", dtype_name, n, CPU_PEAK_REPS)
        best = max(best, rate)
        if 2 * n**3 / rate >= CPU_PEAK_GROW_S:
            break
    return best


def cpu_peak(dtype_name: str = "float32", refresh: bool = False) -> dict:
    """This CPU's GEMM rate for ``dtype_name`` at the current thread count: {flops, key, path,
    measured_at,
    cached}. Read from the cache when present; otherwise measured (the best rate of 256^3, 512^3
    and 1024^3 GEMMs, each the fastest of 10) and
    cached."""
    key = cpu_peak_key(dtype_name)
    path = cpu_peak_path(key)
    if not refresh and str(path) in _CPU_PEAKS:
        return _CPU_PEAKS[str(path)]
    record = None
    if not refresh and path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("key") != key or not record.get("flops", 0) > 0:
                record = None
            else:
                record["cached"] = True
        except (OSError, ValueError):
            record = None  # unreadable: measure again and overwrite
    if record is None:
        record = {
            "flops": cpu_gemm_peak(dtype_name),
            "key": key,
            "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "cached": False,
        }
        record["write_error"] = _write_atomic(path, record)
    record["path"] = str(path)
    _CPU_PEAKS[str(path)] = record
    return record


def _write_atomic(path: Path, record: dict) -> Optional[str]:
    """Write ``record`` as JSON (temp file + rename: concurrent runs never read half a file); the
    error, if any."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(
                {k: v for k, v in record.items() if k not in ("cached", "path", "write_error")},
                f,
                indent=1,
            )
        os.replace(tmp, path)
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def measured_copy_bandwidth(device: torch.device, nbytes: int = 64 * 2**20, reps: int = 5) -> float:
    """Bytes read + written per second by one large tensor copy on ``device``."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_time(lambda: dst.copy_(src), device.type, reps)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[Optional[float], str]:
    """(peak FLOP/s, where it comes from) for MFU: the datasheet for known GPUs, a GEMM
    microbenchmark on CPU."""
    dname = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for key, rates in PEAK_FLOPS.items():
            if key in gpu and dname in rates:
                return rates[dname], f"datasheet {key} {dname}"
        return None, f"no datasheet peak for {gpu} {dname}"
    rec = cpu_peak(dname)
    how = (
        f"cached {rec['path']}"
        if rec["cached"]
        else f"not cached: {rec['write_error']}"
        if rec.get("write_error")
        else f"now, cached in {rec['path']}"
    )
    return rec["flops"], (
        f"measured {dname} GEMMs ({CPU_PEAK_GEMM})^3 on this CPU ({rec['key']['cpu']}, "
        f"{rec['key']['threads']} threads) at {rec['measured_at']}; {how}"
    )


def roofline_rates(device: torch.device, dtype: torch.dtype) -> dict:
    """Peak FLOP/s and memory bandwidth: measured here (GEMM, copy); the H100 datasheet on the meta
    device."""
    if device.type == "meta":
        return {
            "flops": META_RATES["flops"].get(dtype, 67e12),
            "bytes_per_s": META_RATES["bytes_per_s"],
            "source": "H100 SXM datasheet (meta device)",
        }
    peak, source = peak_flops(device, dtype)
    return {
        "flops": peak or 67e12,
        "bytes_per_s": measured_copy_bandwidth(device),
        "source": f"{source}; measured copy",
    }


def device_memory_bytes(device: torch.device) -> tuple[Optional[int], str]:
    """(bytes this process may use on ``device``, where the figure comes from); None when unknown.

    CUDA: the device's total memory. CPU: physical RAM, lowered by a cgroup memory limit
    (containers, SLURM)
    and by the address-space limit (``ulimit -v``) when either is smaller.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(
            device
        ).total_memory, f"{torch.cuda.get_device_name(device)} total"
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
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge sentinel: no limit
            found.append((int(text), f"cgroup limit ({path})"))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            found.append((soft, "address-space limit (ulimit -v)"))
    except (ImportError, ValueError, OSError):
        pass
    return min(found) if found else (None, "unknown")


def main(argv: Optional[list[str]] = None) -> int:
    """Show the cached CPU peak for this machine, torch and thread count; --refresh measures it
    again."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--refresh", action="store_true", help="measure again and overwrite the cache")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (runs default to trainer.num_threads=1)",
    )
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = cpu_peak(args.dtype, refresh=args.refresh)
    print(
        f"{rec['flops'] / 1e9:.1f} GFLOP/s {args.dtype}, {rec['key']['threads']} threads, "
        f"{rec['key']['cpu']}, "
        f"torch {rec['key']['torch']}, measured {rec['measured_at']} "
        f"({'cached' if rec['cached'] else 'now'}): "
        f"{rec['path']}"
        + (f" (not written: {rec['write_error']})" if rec.get("write_error") else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def env_info(device: torch.device, dtype: torch.dtype) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "dtype": str(dtype).replace("torch.", ""),
        "num_threads": torch.get_num_threads(),
        # Recorded in the run's own results (not the repo) so a sweep over machines can be told
        # apart.
        "hostname": socket.gethostname(),
        # the code's commit (recompute_lab.record.provenance); W&B's config has it too
        "git": git_info(),
    }

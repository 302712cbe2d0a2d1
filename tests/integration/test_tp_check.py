"""A real tp=2 run (torchrun, gloo, CPU, two processes) saves, per rank, exactly what the meta
estimate of the same
layout measures with a fake process group, and holds the same parameter shards
(recompute_lab.cli.tp_check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recompute_lab.cli.tp_check import meta_estimate


def torchrun(out: Path, sp: int, strategy: str) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "recompute_lab.tp_check",
        str(out),
        "--sp",
        str(sp),
        "--strategy",
        strategy,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    "sp,strategy",
    [
        (1, "none"),
        pytest.param(0, "full", marks=pytest.mark.slow),
        pytest.param(1, "selective", marks=pytest.mark.slow),
    ],
)
def test_real_tp2_ranks_equal_the_meta_estimate(tmp_path, sp, strategy):
    ranks = torchrun(tmp_path, sp, strategy)
    meta = meta_estimate(2, bool(sp), strategy)
    for got in ranks:
        assert got["by_module"] == meta["by_module"]
        assert got["saved_total"] == meta["saved_total"]
        assert (got["numel"], got["storage_bytes"]) == (meta["numel"], meta["storage_bytes"])

"""A real tp=2 run (torchrun, gloo, CPU, two processes) saves, per rank, exactly what the meta
estimate of the same
layout measures with a fake process group, and holds the same parameter shards
(recompute_lab.cli.tp_check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recompute_lab.cli.tp_check import meta_estimate

from conftest import run_cli


def torchrun(out: Path, sp: int, strategy: str) -> list[dict]:
    # the launcher starts warm; its two ranks are fresh interpreters with one thread each
    # (torchrun's default for several ranks when OMP_NUM_THREADS is unset)
    args = ["--standalone", "--nproc_per_node=2", "-m", "recompute_lab.tp_check", str(out)]
    proc = run_cli(
        [*args, "--sp", str(sp), "--strategy", strategy],
        cwd=out,
        module="torch.distributed.run",
        timeout=240,
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

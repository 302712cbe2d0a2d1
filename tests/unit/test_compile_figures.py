"""The committed compile benchmark (experiments/figures/compile/) is what the current code makes.

experiments/bench_compile.py commits raw.json (every measured point), the table and figure derived
from it, and
manifest.json (sha256 of each). Failing here means: rerun `python experiments/bench_compile.py` and
commit what it
writes (or, after a change to the table/figure code only, `--from-raw
experiments/figures/compile/raw.json`).
- derivation: raw.json, derived by the current code, gives the committed table.csv and table.md byte
for byte
  (and frontier.png under the manifest's matplotlib version);
- measurement: two committed points (the partitioner at activation_memory_budget 0.5 and the planner
at a 50%
  budget), remeasured now without timing, give the same saved bytes and recompute FLOPs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import pytest

from conftest import ROOT, one_thread_fixture

sys.path.insert(0, str(ROOT / "experiments"))
import bench_compile as bc  # noqa: E402

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)
FIGS = bc.OUT


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads((FIGS / "raw.json").read_text())


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIGS / "manifest.json").read_text())


@pytest.fixture(scope="module")
def derived(tmp_path_factory, raw):
    out = tmp_path_factory.mktemp("compile_fresh")
    (out / "raw.json").write_text((FIGS / "raw.json").read_text())
    bc.write_derived(raw, out)
    return out


def test_manifest_hashes_the_committed_files(manifest):
    for name in bc.FILES:
        assert manifest["sha256"][name] == _sha(FIGS / name), (
            f"experiments/figures/compile/{name} is stale"
        )


@pytest.mark.parametrize("name", ["table.csv", "table.md"])
def test_committed_table_is_what_raw_json_derives_to(derived, name):
    assert (derived / name).read_text() == (FIGS / name).read_text(), (
        f"experiments/figures/compile/{name} is stale: python experiments/bench_compile.py "
        f"--from-raw "
        "experiments/figures/compile/raw.json"
    )


def test_committed_figure_is_what_raw_json_draws(derived, manifest):
    import matplotlib

    if matplotlib.__version__ != manifest["matplotlib"]:
        pytest.skip(f"PNG bytes compared only under matplotlib {manifest['matplotlib']}")
    assert _sha(derived / "frontier.png") == _sha(FIGS / "frontier.png")


def test_table_rows_fit_their_budget_and_cover_every_family(raw):
    rows = bc.table(raw)
    assert [r["budget"] for r in rows] == bc.FRACTIONS
    none = raw["none"]["saved_bytes"]
    for r in rows:
        for fam in (
            "partitioner",
            "fixed",
        ):  # chosen among points that fit; the planner's own must fit too
            assert r[f"{fam}_saved_bytes"] is None or r[f"{fam}_saved_bytes"] <= r["budget"] * none
    assert {p["family"] for p in raw["points"]} == set(bc.FAMILIES)
    assert all(
        p["grad_rel_diff"] < 1e-4 for p in raw["points"]
    )  # every arm computes eager none's gradients


def test_committed_points_are_what_the_code_measures_now(raw):
    import torch

    s = raw["settings"]
    args = argparse.Namespace(seq_len=s["seq_len"], batch=s["batch"], rounds=0)
    ref = bc.reference(args)
    assert ref["saved_bytes"] == raw["none"]["saved_bytes"]
    stale = []
    checks = [
        (
            "partitioner",
            {"knob": 0.5},
            lambda: bc.build(bc.shape_overrides(args), compile_knob=0.5),
        ),
        (
            "planner",
            {"fraction": 0.5},
            lambda: bc.build(
                bc.planner_overrides(args, 0.5, ref["saved_bytes"]), compile_knob=False
            ),
        ),
    ]
    for family, key, make in checks:
        old = next(
            p
            for p in raw["points"]
            if p["family"] == family and all(p.get(k) == v for k, v in key.items())
        )
        new = bc.measure(*make(), ref, args)
        stale += [
            f"{family} {key}: {k} committed {old[k]} now {new[k]}"
            for k in bc.DETERMINISTIC
            if old[k] != new[k]
        ]
    torch._dynamo.reset()
    assert not stale, (
        "experiments/figures/compile/raw.json is stale (rerun bench_compile.py):\n"
        + "\n".join(stale)
    )

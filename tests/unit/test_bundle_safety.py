"""Hostile bundles for ``experiments/reproduce_figures.py --from-bundle`` (issue 31): run names that
leave the target folder or pass a symlink, and decompression without a limit, are refused before
anything is written."""

from __future__ import annotations

import gzip
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import reproduce_figures as rf  # noqa: E402

RECORD = {"status": "ok", "schema_version": 1}


def _bundle(path, data) -> object:
    with gzip.open(path, "wb") as gz:
        gz.write(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


@pytest.mark.parametrize(
    "name", ["../escaped", "a/../../escaped", "/tmp/recompute_lab_escaped", "", ".", "a/./b"]
)
def test_names_outside_the_target_folder_are_refused(tmp_path, name):
    victim = tmp_path / "escaped"
    bundle = _bundle(tmp_path / "b.json.gz", {"fine": RECORD, name: RECORD})
    runs = tmp_path / "runs" / "inner"
    with pytest.raises(rf.BundleError, match="relative path inside the target folder"):
        rf.unpack_bundle(bundle, runs)
    assert not victim.exists() and not (runs / "fine").exists()  # nothing written at all
    assert not os.path.exists("/tmp/recompute_lab_escaped")


def test_a_planted_symlink_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "link").symlink_to(outside)
    bundle = _bundle(tmp_path / "b.json.gz", {"link/run": RECORD})
    with pytest.raises(rf.BundleError, match="symlink"):
        rf.unpack_bundle(bundle, runs)
    assert list(outside.iterdir()) == []
    # a symlink planted as the record itself is not written through either
    (runs / "r").mkdir()
    (runs / "r" / "results.json").symlink_to(outside / "victim.json")
    with pytest.raises(rf.BundleError, match="already exists"):
        rf.unpack_bundle(_bundle(tmp_path / "c.json.gz", {"r": RECORD}), runs)
    assert not (outside / "victim.json").exists()


def test_decompression_stops_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(rf, "MAX_BUNDLE_BYTES", 10_000)
    bomb = _bundle(tmp_path / "bomb.json.gz", b"{" + b" " * 50_000 + b"}")
    with pytest.raises(rf.BundleError, match="more than 10,000 bytes"):
        rf.read_bundle(bomb)
    small = _bundle(tmp_path / "ok.json.gz", {"a": RECORD})
    assert rf.read_bundle(small) == {"a": RECORD}


def test_not_a_record_map_and_deep_nesting_are_refused(tmp_path):
    for data in ([RECORD], {"a": 3}, b"[" * 100_000 + b"]" * 100_000, b"not gzip"):
        path = tmp_path / "x.json.gz"
        if data == b"not gzip":
            path.write_bytes(data)
        else:
            _bundle(path, data)
        with pytest.raises(rf.BundleError):
            rf.read_bundle(path)


def test_cli_refuses_a_hostile_bundle_with_exit_2(tmp_path, capsys):
    bundle = _bundle(tmp_path / "b.json.gz", {"../../x": RECORD})
    assert rf.main(["--from-bundle", str(bundle), "--out", str(tmp_path / "out")]) == 2
    assert "relative path inside the target folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""The typed run record (recompute_lab.record.result): records round-trip exactly, an old main's
record loads, the
committed JSON Schema is the one the dataclasses give and it rejects what the contract forbids.
(Every record a
test run writes is also validated: tests/conftest.py sets RECOMPUTE_LAB_VALIDATE_RECORDS=1.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recompute_lab.record.result import SCHEMA_FILE, RecordError, RunResult, json_schema, validate

RECORDS = sorted((Path(__file__).resolve().parents[1] / "data" / "records").glob("*.json"))


def test_committed_schema_is_the_one_the_dataclasses_give():
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), (
        "recompute_lab/record/results.schema.json is stale: write json_schema() to it"
    )


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_records_round_trip_exactly_and_match_the_schema(path):
    data = json.loads(path.read_text())
    rec = RunResult.load(path)
    assert rec.to_dict() == data and list(rec.to_dict()) == list(data)  # same keys, same order
    validate(data)
    assert rec.memory.activation_bytes.measured == data["memory"]["activation_bytes"]["measured"]
    assert (
        rec.flops.per_step == data["flops"]["per_step"]
        and rec.loss.history == data["loss"]["history"]
    )


def test_a_record_written_by_an_earlier_main_loads():
    """main of 2026-11-29 (the committed figures' bundle) wrote no env.git: it loads, its figures
    typed."""
    old = Path(__file__).resolve().parents[1] / "data" / "records" / "main_2026-11-29_none.json"
    rec = RunResult.load(old)
    assert (
        "git" not in rec.env
        and rec.status == "ok"
        and rec.memory.peak_bytes.source == "mem_tracker"
    )


def test_a_record_missing_sections_loads_with_nones():
    rec = RunResult.from_dict({"schema_version": 1, "status": "oom", "config": {}})
    assert rec.memory.peak_bytes.predicted is None and rec.time.step_s == [] and rec.error is None
    assert rec.to_dict() == {"schema_version": 1, "status": "oom", "config": {}}


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda d: d.update(status="finished"), "status"),
        (lambda d: d["memory"]["peak_bytes"].update(measured="abc"), "peak_bytes"),
        (lambda d: d["memory"].update(activation_bytes=[1, 2]), "activation_bytes"),
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d.update(config="model=tiny"), "config"),
    ],
)
def test_what_the_contract_forbids_is_refused(change, needle):
    data = json.loads(RECORDS[0].read_text())
    change(data)
    with pytest.raises(RecordError, match=needle):
        validate(data)
        RunResult.from_dict(data)


def test_infinite_bytes_are_the_strings_the_writer_uses():
    data = json.loads(RECORDS[0].read_text())
    data["memory"]["peak_bytes"]["predicted"] = "inf"
    validate(data)
    data["memory"]["peak_bytes"]["predicted"] = "infinite"
    with pytest.raises(RecordError):
        validate(data)


@pytest.mark.parametrize(
    "text", ["not json", "[1, 2]", "[" * 100000 + "]" * 100000, '{"status": "ok"']
)
def test_files_that_are_not_records_are_a_clear_error(tmp_path, text):
    path = tmp_path / "results.json"
    path.write_text(text)
    with pytest.raises(RecordError, match="results.json"):
        RunResult.load(path)


def test_the_run_folder_writes_through_the_contract(tmp_path, monkeypatch):
    """Under test every written record is validated (a misfit raises); outside tests a misfit is
    still written,
    with the reason, because a run record is never lost."""
    from recompute_lab.record.folder import RESULTS, RunFolder
    from recompute_lab.record.result import VALIDATE_ENV

    bad = {**json.loads(RECORDS[0].read_text()), "status": "finished"}
    folder = RunFolder(tmp_path)
    monkeypatch.setenv(VALIDATE_ENV, "1")
    with pytest.raises(RecordError, match="status"):
        folder.finish(bad)
    monkeypatch.delenv(VALIDATE_ENV)
    folder.finish(bad)
    written = json.loads((tmp_path / RESULTS).read_text())
    assert written["status"] == "finished" and "status 'finished'" in written["record_error"]

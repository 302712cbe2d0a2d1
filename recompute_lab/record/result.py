"""The typed run record: ``RunResult`` is what results.json holds, its JSON Schema, and the one way
to read one.

Layer: record (no torch). The engine fills a results dict as the run goes
(recompute_lab.record.results.new_results
has every contract key); every write goes through :meth:`RunResult.from_dict`
(recompute_lab.record.folder), so a
record that does not fit the contract fails where it is written, not in an analysis later. The
analysis reads
records with :meth:`RunResult.load` (recompute_lab.analysis.aggregate).

The contract (schema_version 1, DESIGN.md section 3) is typed section by section: status, the
``memory`` / ``flops`` / ``time`` / ``loss`` figures every analysis reads. Each section keeps the
keys it does not
type in ``extra``, so a record round-trips exactly (``from_dict(d).to_dict() == d``), records
written by earlier
versions load (missing keys are None), and a new key needs no schema change until an analysis relies
on it.
Bytes are integers; a non-finite figure is written as the string "inf" / "-inf" (JSON has no
infinity).

``json_schema()`` derives the JSON Schema (draft 2020-12) from these dataclasses; the committed
recompute_lab/record/results.schema.json is its output (tests/unit/test_record.py keeps it fresh).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "diverged", "interrupted", "error", "running")
SCHEMA_FILE = Path(__file__).with_name("results.schema.json")
VALIDATE_ENV = (
    "RECOMPUTE_LAB_VALIDATE_RECORDS"  # "1": every write is also checked against the JSON Schema
)

Number = Union[int, float, str]  # a figure; str only for "inf" / "-inf"
Bytes = Union[int, str]  # bytes; str only for "inf" / "-inf"


class RecordError(ValueError):
    """A file that is not a run record of this contract (not JSON, not an object, a section of the
    wrong type)."""


@dataclass
class Section:
    """A record section: its typed keys, and ``extra`` for every other key (kept in order, written
    back)."""

    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str, problems: Optional[list] = None) -> "Section":
        """``problems``: None raises RecordError on a section of the wrong type; a list collects the
        problem
        and reads the section as empty (the analysis keeps a damaged record's other figures)."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            if problems is None:
                raise RecordError(f"{where} is a {type(data).__name__}, not an object")
            problems.append(f"{where} is a {type(data).__name__}, not an object: read as empty")
            return cls()
        typed = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra" or f.name not in data:
                continue
            sub = _section_type(f.type)
            kwargs[f.name] = (
                sub.from_dict(data[f.name], f"{where}.{f.name}", problems) if sub else data[f.name]
            )
        obj = cls(**kwargs)
        obj.extra = {k: v for k, v in data.items() if k not in typed}
        obj._order = list(data)  # type: ignore[attr-defined]  # written back in the order read
        obj._present = set(data)  # type: ignore[attr-defined]
        return obj

    def to_dict(self) -> dict:
        present = getattr(self, "_present", None)
        out: dict = {}
        for f in dataclasses.fields(self):
            if f.name == "extra" or (present is not None and f.name not in present):
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Section) else value
        out.update(self.extra)
        order = getattr(self, "_order", None)
        return (
            out
            if order is None
            else {k: out[k] for k in [*order, *[k for k in out if k not in order]]}
        )


@dataclass
class Figure(Section):
    """A predicted quantity beside its measurement (bytes of one kind)."""

    predicted: Optional[Bytes] = None
    measured: Optional[Bytes] = None


@dataclass
class ModelStateBytes(Figure):
    per_param: Optional[dict] = None  # measured bytes by kind: params, grads, master, optimizer


@dataclass
class ActivationBytes(Figure):
    by_module: Optional[dict] = None  # saved bytes of one micro-batch by module


@dataclass
class PeakBytes(Figure):
    source: Optional[str] = None  # cuda_allocator | mem_tracker


@dataclass
class Memory(Section):
    model_state_bytes: ModelStateBytes = field(default_factory=ModelStateBytes)
    activation_bytes: ActivationBytes = field(default_factory=ActivationBytes)
    peak_bytes: PeakBytes = field(default_factory=PeakBytes)


@dataclass
class Flops(Section):
    per_step: Optional[dict] = None  # counted: forward, backward, recompute
    predicted_per_step: Optional[dict] = None  # recompute_lab.predict.prediction
    recompute_overhead: Optional[Number] = None
    mfu: Optional[Number] = None
    hfu: Optional[Number] = None


@dataclass
class Time(Section):
    step_s_median: Optional[Number] = None
    step_s_p90: Optional[Number] = None
    tokens_per_s: Optional[Number] = None
    warmup_steps: Optional[int] = None
    step_s: list = field(default_factory=list)
    # the loop's own time beside the steps: iterations, wall_s, step_s, data_s, log_s, other_s,
    # outside_step (recompute_lab.run.engine.LoopClock)
    loop: Optional[dict] = None


@dataclass
class Loss(Section):
    first: Optional[Number] = None
    final: Optional[Number] = None
    history: list = field(default_factory=list)


@dataclass
class RunResult(Section):
    """One run's record: what was asked (config), what the strategy did (strategy: its Plan), what
    was predicted
    and measured (memory, flops, time, loss) and how it ended (status, error)."""

    schema_version: int = SCHEMA_VERSION
    status: str = "error"
    error: Optional[str] = None
    config: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    strategy: dict = field(default_factory=dict)
    loss: Loss = field(default_factory=Loss)
    memory: Memory = field(default_factory=Memory)
    flops: Flops = field(default_factory=Flops)
    time: Time = field(default_factory=Time)

    @classmethod
    def from_dict(
        cls,
        data: Any,
        where: str = "results.json",  # type: ignore[override]
        problems: Optional[list] = None,
    ) -> "RunResult":
        """The record ``data``; RecordError if it breaks the contract. With a ``problems`` list, a
        damaged
        section or status is listed there instead and read as empty (not a JSON object, or a
        schema_version
        this code cannot read, still raise)."""
        if not isinstance(data, dict):
            raise RecordError(f"{where} is not a JSON object")
        if (
            not isinstance(data.get("schema_version"), int)
            or not 1 <= data["schema_version"] <= SCHEMA_VERSION
        ):
            raise RecordError(
                f"{where}: schema_version {data.get('schema_version')!r} is not one this code "
                f"reads (1..{SCHEMA_VERSION})"
            )
        obj = super().from_dict(data, where, problems)
        found = []
        if obj.status not in STATUSES:
            found.append(f"{where}: status {obj.status!r} is not one of {', '.join(STATUSES)}")
        for name in ("config", "env", "model", "strategy"):
            if not isinstance(getattr(obj, name), dict):
                found.append(
                    f"{where}.{name} is a {type(getattr(obj, name)).__name__}, not an object"
                )
                if problems is not None:
                    setattr(obj, name, {})
        if found and problems is None:
            raise RecordError(found[0])
        if problems is not None:
            problems += found
        obj.problems = list(problems or [])  # type: ignore[attr-defined]
        return obj  # type: ignore[return-value]

    @classmethod
    def load(cls, path: Path, lenient: bool = False) -> "RunResult":
        """Read a record (any schema_version up to this code's); RecordError when it is not one.
        ``lenient``:
        damaged sections are read as empty and listed in ``.problems`` (the analysis keeps the
        rest)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise RecordError(
                f"{path}: not a readable JSON record ({type(e).__name__}: {str(e)[:120]})"
            ) from None
        return cls.from_dict(data, str(path), [] if lenient else None)


def _section_type(tp: Any) -> Optional[type]:
    """The Section subclass a field holds (annotations are strings under postponed evaluation)."""
    if isinstance(tp, str):
        tp = _HINTS.get(tp)
    return tp if isinstance(tp, type) and issubclass(tp, Section) else None


_HINTS = {
    "Loss": Loss,
    "Memory": Memory,
    "Flops": Flops,
    "Time": Time,
    "ModelStateBytes": ModelStateBytes,
    "ActivationBytes": ActivationBytes,
    "PeakBytes": PeakBytes,
}


# -- JSON Schema
# ------------------------------------------------------------------------------------------------

_NONFINITE = {"type": "string", "enum": ["inf", "-inf"]}


def _schema_of(tp: Any) -> dict:
    """The JSON Schema of one field annotation (a string under postponed evaluation)."""
    sub = _section_type(tp)
    if sub is not None:
        return _section_schema(sub)
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    nullable = text.startswith("Optional[")
    inner = text[len("Optional[") : -1] if nullable else text
    base = {
        "int": {"type": "integer"},
        "str": {"type": "string"},
        "dict": {"type": "object"},
        "list": {"type": "array"},
        "Number": {"anyOf": [{"type": "number"}, _NONFINITE]},
        "Bytes": {"anyOf": [{"type": "integer"}, _NONFINITE]},
    }[inner]
    return {"anyOf": [base, {"type": "null"}]} if nullable else base


def _section_schema(cls: type) -> dict:
    props = {f.name: _schema_of(f.type) for f in dataclasses.fields(cls) if f.name != "extra"}
    return {"type": "object", "properties": props, "additionalProperties": True}


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of results.json, from the dataclasses above."""
    schema = _section_schema(RunResult)
    schema["properties"]["status"] = {"type": "string", "enum": list(STATUSES)}
    schema["properties"]["schema_version"] = {
        "type": "integer",
        "minimum": 1,
        "maximum": SCHEMA_VERSION,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/recompute_lab/results.schema.json",
        "title": "recompute_lab results.json",
        "description": __doc__.split("\n\n")[0],
        **schema,
        "required": ["schema_version", "status", "config", "memory", "flops", "time", "loss"],
    }


_VALIDATOR = None


def validate(data: dict) -> None:
    """Check ``data`` against the committed JSON Schema (jsonschema, the ``dev`` extra); RecordError
    if it fails."""
    global _VALIDATOR
    if _VALIDATOR is None:
        # test-time dependency: only when RECOMPUTE_LAB_VALIDATE_RECORDS=1 or asked directly
        import jsonschema

        _VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise RecordError(
            f"results.json does not match its schema at {'.'.join(map(str, e.absolute_path))}: "
            f"{e.message[:200]}"
        )

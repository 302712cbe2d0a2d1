"""The bad-input table (issue 31): each bad input of the issue run through the real CLI, the
outcome it must have (a clear error with its exit status, or honoured) against what it does.

    python experiments/bad_inputs.py            # writes experiments/figures/bad_inputs.md

Each cell is one command in a subprocess (``python -m recompute_lab.<app> ...``, W&B offline, a
fresh temporary folder, 120 s limit). Its outcome is read from the exit status and stderr:

    hang                 the limit passed
    traceback            "Traceback" on stderr
    silently accepted    exit 0 where a refusal was expected
    clear error (exit N) a non-zero exit with a message and no traceback
    honoured (exit 0)    exit 0 where that was expected

and a cell may also require words on stderr (``must``: the message names what is wrong) or
forbid some (``never``: e.g. torch's advice to retry with weights_only=False); a cell whose words
are wrong is "misleading". A cell *held* when the outcome is the expected one.
tests/integration/test_bad_inputs.py checks the committed table against the cells planned here,
and regenerates it under ``-m slow`` (~3-4 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "figures" / "bad_inputs.md"
FAST = [
    "logger=none",
    "trainer.progress=false",
    "trainer.overhead.enabled=false",
    "trainer.probe=false",
    "trainer.steps=2",
    "~local",
]
HF = ["model=hf", "data.seq_len=16", "data.batch_size=1"]
LIMIT_S = 120
ERR2, ERR1, OK = "clear error (exit 2)", "clear error (exit 1)", "honoured (exit 0)"

SMALL_LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
}


@dataclass(frozen=True)
class Cell:
    name: str  # the bad input, as the table shows it
    args: tuple[str, ...]  # the command line ({tmp}: the cell's folder)
    expected: str
    app: str = "train"  # recompute_lab.<app>
    must: tuple[str, ...] = ()  # words stderr must hold
    never: tuple[str, ...] = ()  # words stderr must not hold
    finding: str = ""  # the finding it comes from
    fast: tuple[str, ...] = field(default=tuple(FAST))  # prepended for train


CELLS: tuple[Cell, ...] = (
    # 4: memory allocated before the guard
    Cell(
        "model.vocab_size=50000000",
        ("model.vocab_size=50000000",),
        ERR1,
        finding="4",
        must=("nothing was allocated",),
    ),
    Cell(
        "HF config with vocab 1e12",
        (*HF, "model.hf.config={tmp}/vocab1e12.json"),
        ERR1,
        finding="4",
        must=("model state alone",),
        never=("DefaultCPUAllocator",),
    ),
    # 9: tracebacks
    Cell(
        "HF config: hidden_size a string",
        (*HF, "model.hf.config={tmp}/wrongtype.json"),
        ERR2,
        finding="9",
        must=("hidden_size",),
    ),
    Cell("HF config: 0 heads", (*HF, "model.hf.config={tmp}/zeroheads.json"), ERR2, finding="9"),
    Cell(
        "HF config.json nested 100,000 deep",
        (*HF, "model.hf.config={tmp}/nested.json"),
        ERR2,
        finding="9",
        must=("RecursionError",),
    ),
    Cell(
        "HF config: 4000-digit vocab",
        (*HF, "model.hf.config={tmp}/digits.json"),
        ERR2,
        finding="9",
        must=("4000 digits",),
    ),
    Cell(
        "model.hf.family=gpt2 on a Llama config",
        (*HF, "model.hf.config={tmp}/ok.json", "+model.hf.family=gpt2"),
        ERR2,
        finding="9",
        must=("family",),
    ),
    Cell(
        "trainer.seed=2**64+",
        ("trainer.seed=99999999999999999999",),
        ERR2,
        finding="9",
        must=("trainer.seed",),
    ),
    Cell("data.seed=-1", ("data.seed=-1",), ERR2, finding="9"),
    Cell(
        "hydra.run.dir under a file",
        ("hydra.run.dir={tmp}/a_file/run",),
        ERR2,
        finding="9",
        must=("is a file",),
    ),
    Cell(
        "hydra.run.dir under /proc",
        ("hydra.run.dir=/proc/recompute_lab/run",),
        ERR2,
        finding="9",
        must=("/proc",),
    ),
    Cell(
        "-m hydra.sweep.dir under a file",
        ("-m", "hydra.sweep.dir={tmp}/a_file/${{now:%H}}", "trainer.seed=1,2"),
        ERR2,
        finding="9",
    ),
    # 10: hangs
    Cell(
        "estimate model.n_layer=1000000000",
        ("model.n_layer=1000000000",),
        ERR2,
        app="estimate",
        finding="10",
        must=("more blocks",),
        fast=("~local",),
    ),
    Cell(
        "train model.n_layer=200000 model.d_model=8",
        ("model.n_layer=200000", "model.d_model=8", "model.n_head=1"),
        ERR2,
        finding="10",
    ),
    Cell(
        "HF config with 200,000 layers",
        (*HF, "model.hf.config={tmp}/layers200k.json"),
        ERR2,
        finding="10",
        must=("more blocks",),
    ),
    # 11: documented override refused
    Cell(
        "local=example",
        ("local=example",),
        OK,
        finding="11",
        fast=tuple(a for a in FAST if a != "~local"),
    ),
    Cell(
        "local=nope",
        ("local=nope",),
        ERR2,
        finding="11",
        must=("valid: example",),
        fast=tuple(a for a in FAST if a != "~local"),
    ),
    # 12: silently accepted
    Cell("optimizer.name=sgd", ("optimizer.name=sgd",), ERR2, finding="12", must=("adamw",)),
    Cell("compile.scope=model without a backend", ("compile.scope=model",), ERR2, finding="12"),
    Cell(
        "estimate.layout.device_gb=nan without a layout",
        ("estimate.layout.device_gb=nan",),
        ERR2,
        app="estimate",
        finding="12",
        fast=("~local",),
    ),
    Cell(
        "model.norm=layernorm on an HF Llama",
        (*HF, "model.hf.config={tmp}/ok.json", "model.norm=layernorm"),
        ERR2,
        finding="12",
        must=("+model.hf.overrides",),
    ),
    Cell(
        "model.hf.config=gpt2 with model=tiny",
        ("model.hf.config=gpt2",),
        ERR2,
        finding="12",
        must=("model=hf only",),
    ),
    Cell(
        "trainer.memory_snapshot=true on CPU",
        ("trainer.memory_snapshot=true", "trainer.probe=true"),
        ERR2,
        finding="12",
        must=("valid here",),
    ),
    Cell("model.vocab_size=1", ("model.vocab_size=1",), ERR2, finding="12"),
    # 8: planted symlinks
    Cell(
        "run folder with a planted train.log symlink",
        ("hydra.run.dir={tmp}/planted",),
        ERR2,
        finding="8",
        must=("symlinks that recompute_lab did not make",),
    ),
    # 14: W&B limits
    Cell(
        "model.name of 80 characters, W&B offline",
        (
            "model.name=" + "m" * 80,
            "logger=wandb",
            "logger.mode=offline",
            "hydra.run.dir={tmp}/long",
        ),
        OK,
        finding="14",
        never=("init failed",),
    ),
    # 15: smaller
    Cell(
        "HF .bin weights (pickle)",
        (*HF, "model.hf.config={tmp}/binw", "model.hf.weights={tmp}/binw"),
        ERR2,
        finding="15",
        must=("safetensors",),
        never=("weights_only=False",),
    ),
    Cell(
        "analyze a sweep with a hostile overrides.yaml and a 100,000-deep record",
        ("{tmp}/hostile_sweep",),
        OK,
        app="analyze",
        finding="7, 15",
        fast=(),
    ),
    Cell(
        "dashboard --sweep-dir with a hostile overrides.yaml",
        ("--entity", "e", "--project", "p", "--sweep-dir", "{tmp}/hostile_sweep", "--dry-run"),
        ERR2,
        app="cli.dashboard",
        finding="15",
        must=("not a Hydra overrides list",),
        fast=(),
    ),
    # earlier findings, kept as regressions
    Cell("+strategy=nope", ("+strategy=nope",), ERR1, finding="-", must=("strategy",)),
    Cell("data.seq_len=0", ("data.seq_len=0",), ERR2, finding="-"),
)


def prepare(tmp: Path) -> None:
    """The files the cells name under {tmp}."""

    def config(name: str, **changes) -> None:
        (tmp / f"{name}.json").write_text(json.dumps({**SMALL_LLAMA, **changes}))

    config("ok")
    config("wrongtype", hidden_size="sixty-four")
    config("zeroheads", num_attention_heads=0)
    config("vocab1e12", vocab_size=10**12)
    config(
        "layers200k",
        num_hidden_layers=200000,
        hidden_size=8,
        num_attention_heads=1,
        num_key_value_heads=1,
        intermediate_size=8,
    )
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    (tmp / "nested.json").write_text(json.dumps(SMALL_LLAMA)[:-1] + f', "x": {deep}}}')
    (tmp / "digits.json").write_text(
        json.dumps(SMALL_LLAMA).replace('"vocab_size": 256', '"vocab_size": ' + "9" * 4000)
    )
    (tmp / "a_file").write_text("")
    binw = tmp / "binw"
    binw.mkdir()
    (binw / "config.json").write_text(json.dumps(SMALL_LLAMA))
    (binw / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a real pickle")
    planted = tmp / "planted"
    planted.mkdir()
    (tmp / "victim.log").write_text("theirs\n")
    os.symlink(tmp / "victim.log", planted / "train.log")
    sweep = tmp / "hostile_sweep"
    for i, record in enumerate(
        [
            '{"status": "error", "error": "x"}',
            '{"status": "ok", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        ]
    ):
        (sweep / str(i) / ".hydra").mkdir(parents=True)
        (sweep / str(i) / "results.json").write_text(record)
        (sweep / str(i) / ".hydra" / "overrides.yaml").write_text("- a: [\n  !!python/object:x\n")


def outcome(cell: Cell, tmp: Path) -> str:
    """What the command does (see the module docstring)."""
    args = [a.format(tmp=tmp) for a in cell.args]
    if cell.app in ("train", "estimate"):
        args = [*cell.fast, *args]
        if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
            args.append(f"hydra.run.dir={tmp}/run")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "0",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", f"recompute_lab.{cell.app}", *args]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=LIMIT_S, env=env, cwd=tmp
        )
    except subprocess.TimeoutExpired:
        return f"hang (over {LIMIT_S} s)"
    err = proc.stderr
    if "Traceback" in err:
        return "traceback"
    if proc.returncode == 0:
        got = OK if cell.expected == OK else "silently accepted"
    else:
        got = f"clear error (exit {proc.returncode})"
    missing = [w for w in cell.must if w not in err]
    present = [w for w in cell.never if w in err]
    if missing or present:
        why = [f"lacks {w!r}" for w in missing] + [f"says {w!r}" for w in present]
        return f"misleading: {got}, {'; '.join(why)}"
    return got


def table_rows() -> list[dict]:
    rows = []
    for cell in CELLS:
        with tempfile.TemporaryDirectory() as tmp:
            prepare(Path(tmp))
            got = outcome(cell, Path(tmp))
        rows.append(
            {
                "input": cell.name,
                "app": cell.app,
                "finding": cell.finding,
                "expected": cell.expected,
                "actual": got,
                "held": "yes" if got == cell.expected else "NO",
            }
        )
        print(f"{rows[-1]['held']:>3}  {cell.name}: {got}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    held = sum(r["held"] == "yes" for r in rows)
    kinds = {}
    for r in rows:
        kind = r["actual"].split(" (")[0].split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    lines = [
        "# Bad inputs",
        "",
        "Generated by `python experiments/bad_inputs.py`; checked by "
        "tests/integration/test_bad_inputs.py. Each input runs through the real CLI "
        "(`python -m recompute_lab.<app>`) in a fresh folder; *finding* is issue 31's. "
        "Outcomes: clear error (non-zero exit, a message, no traceback), honoured, traceback, "
        f"hang (over {LIMIT_S} s), silently accepted, misleading (the message lacks what it "
        "must name).",
        "",
        f"{held} of {len(rows)} held. Outcomes: "
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        + ".",
        "",
        "| input | app | finding | expected | actual | held |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['input']} | {r['app']} | {r['finding']} | {r['expected']} | {r['actual']} | "
        f"{r['held']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from fault_matrix import write_checked  # experiments/, beside this script

    return write_checked(__doc__, OUT, argv, table_rows, table, lambda r: r["held"] == "yes")


if __name__ == "__main__":
    sys.exit(main())

"""The fault matrix of a training run: each fault injected at each phase, the status the record must
show and where the record must be, against what a tiny run actually does (issue 31).

    python experiments/fault_matrix.py            # writes experiments/figures/fault_matrix.md

Faults to one run: SIGTERM and SIGINT (raised in the process, as SLURM preemption or Ctrl-C
would), an unexpected exception, out of memory, and a full disk (from the phase on, every
atomic write fails with ENOSPC, the record's fallback beside the folder included). Phases: the
checks before the start (preflight: resume checkpoint, guards), the ``running`` record's write,
the W&B start, the model build, a training step, a checkpoint write and the final record's
write. Each cell runs the engine in this process on a fresh folder (model tiny, 3 steps, no
probe, no W&B: ~1 s). A cell *held* when both the status and the place of the final record
(results.json, beside the folder, or one JSON line on stderr) are the expected ones; the table
says FAILED otherwise. Faults to a sweep (SWEEP_EXPECTED): a joblib worker that dies, a SIGTERM
to a sweep run in one process; each a 3-job sweep through the CLI (10-60 s).
tests/integration/test_fault_matrix.py checks the committed table against the cells planned here,
and regenerates it under ``-m slow``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import signal
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "experiments" / "figures" / "fault_matrix.md"
OVERRIDES = [
    "trainer.steps=3",
    "trainer.checkpoint_every=1",
    "trainer.probe=false",
    "logger=none",
    "trainer.progress=false",
    "trainer.overhead.enabled=false",
]
PHASES = (
    "preflight",
    "running record",
    "W&B start",
    "model build",
    "training step",
    "checkpoint",
    "final record",
)
SIGNALS = ("SIGTERM", "SIGINT")
# (fault, phase) -> (status, where the final record is). A signal during training finishes the
# step and checkpoints; during the final write it is noted and the run keeps its status. A full
# disk also refuses the fallback beside the folder: the record goes to stderr.
EXPECTED: dict[tuple[str, str], tuple[str, str]] = {
    **{(s, p): ("interrupted", "results.json") for s in SIGNALS for p in PHASES[:-1]},
    **{(s, "final record"): ("ok", "results.json") for s in SIGNALS},
    **{("error", p): ("error", "results.json") for p in PHASES[:-1]},
    ("error", "final record"): ("ok", "beside the folder"),
    ("oom", "model build"): ("oom", "results.json"),
    ("oom", "training step"): ("oom", "results.json"),
    ("disk full", "running record"): ("error", "stderr"),
    ("disk full", "checkpoint"): ("error", "stderr"),
    ("disk full", "final record"): ("ok", "stderr"),
}

# Faults to a whole sweep (the CLI in a subprocess, 3 jobs, the fault injected into the job with
# trainer.seed=1 by experiments/fault_inject/sitecustomize.py): the tally line and exit status the
# sweep must end with, whatever that job did; no traceback.
SWEEP_EXPECTED: dict[tuple[str, str], str] = {
    ("worker death", "joblib sweep"): "3 jobs: 2 ok, 1 no record (exit 1)",
    ("SIGTERM", "sweep job"): "3 jobs: 1 interrupted, 2 no record, stopped (exit 1)",
}
SWEEP_FAULTS = {"worker death": "die", "SIGTERM": "sigterm"}
SWEEP_ARGS = {"joblib sweep": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], "sweep job": []}


def run_sweep_cell(fault: str, launcher: str, where: Path) -> str:
    """The tally of a 3-job sweep whose first job gets ``fault``: 'N jobs: ... (exit C)', with
    ', stopped' when the tally says a signal stopped it, or what went wrong instead."""
    import os
    import re
    import subprocess

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "experiments" / "fault_inject"), str(ROOT)]),
        "RECOMPUTE_LAB_FAULT": SWEEP_FAULTS[fault],
        "RECOMPUTE_LAB_FAULT_SEED": "1",
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "0",
    }
    steps = "trainer.steps=40" if fault == "SIGTERM" else "trainer.steps=2"
    args = [*OVERRIDES, "trainer.checkpoint_every=0", steps, "trainer.seed=1,2,3", "~local"]
    args += ["hydra.callbacks.analyze.enabled=false", f"hydra.sweep.dir={where / 'sweep'}"]
    cmd = [sys.executable, "-m", "recompute_lab.train", "-m", *SWEEP_ARGS[launcher], *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=where)
    except subprocess.TimeoutExpired:
        return "hang (300 s)"
    out = proc.stdout + proc.stderr
    tallies = re.findall(r"recompute_lab: (\d+ jobs: [^;\n]*)(;[^\n]*stopped)?", out)
    if not tallies:
        return f"no tally (exit {proc.returncode})"
    line, stopped = tallies[-1]
    got = f"{line}{', stopped' if stopped else ''} (exit {proc.returncode})"
    return got + (" + traceback" if "Traceback" in out else "")


class DiskFull:
    """From ``arm()`` on, every atomic write of recompute_lab.record.fileio fails with ENOSPC."""

    def __init__(self) -> None:
        self.armed = False

    def arm(self) -> None:
        self.armed = True
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def patches(self) -> list:
        from recompute_lab.record import fileio

        real_bytes, real_path = fileio.atomic_write_bytes, fileio.atomic_path

        def write_bytes(path, data):
            if self.armed:
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
            return real_bytes(path, data)

        @contextlib.contextmanager
        def atomic_path(path):
            if self.armed:
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
            with real_path(path) as tmp:
                yield tmp

        return [
            mock.patch.object(fileio, "atomic_write_bytes", write_bytes),
            mock.patch.object(fileio, "atomic_path", atomic_path),
        ]


def fire(fault: str, disk: DiskFull) -> None:
    """Inject ``fault`` here (a signal goes through the run's own handler, which decides)."""
    import torch

    if fault in SIGNALS:
        signal.raise_signal(getattr(signal, fault))
    elif fault == "error":
        raise RuntimeError("injected fault")
    elif fault == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    elif fault == "disk full":
        disk.arm()
    else:
        raise ValueError(f"unknown fault {fault!r}; valid: {', '.join(faults())}")


def faults() -> list[str]:
    return list(dict.fromkeys(f for f, _ in EXPECTED))


def phase_patches(phase: str, fault: str, disk: DiskFull) -> list:
    """The patch that fires ``fault`` when the run enters ``phase`` (once)."""
    from recompute_lab.model.data import Batches
    from recompute_lab.record import folder as run_folder
    from recompute_lab.run import checkpoint, engine

    def once(real, when=lambda *a, **k: True):
        state = {"fired": False}

        def wrapper(*args, **kwargs):
            if not state["fired"] and when(*args, **kwargs):
                state["fired"] = True
                fire(fault, disk)
            return real(*args, **kwargs)

        return wrapper

    if phase == "preflight":
        return [mock.patch.object(engine, "preflight", once(engine.preflight))]
    if phase == "running record":
        return [mock.patch.object(run_folder.RunFolder, "start", once(run_folder.RunFolder.start))]
    if phase == "W&B start":
        return [mock.patch.object(engine, "RunLogger", once(engine.RunLogger))]
    if phase == "model build":
        return [mock.patch.object(engine, "build_model", once(engine.build_model))]
    if phase == "training step":
        step_one = lambda self, step, micro=0: step == 1 and micro == 0  # noqa: E731
        return [mock.patch.object(Batches, "get", once(Batches.get, step_one))]
    if phase == "checkpoint":
        return [mock.patch.object(checkpoint, "save", once(checkpoint.save))]
    if phase == "final record":
        final = lambda path, data: data.get("status") != "running"  # noqa: E731
        write = once(run_folder.write_json_atomic, final)
        return [mock.patch.object(run_folder, "write_json_atomic", write)]
    raise ValueError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}")


def run_cell(fault: str, phase: str, where: Path) -> tuple[str, str]:
    """(status, where the final record is) of one tiny run with ``fault`` at ``phase``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from recompute_lab.config import CONF_DIR
    from recompute_lab.record.folder import fallback_path
    from recompute_lab.run import engine

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=OVERRIDES)
    run_dir = where / "run"
    disk = DiskFull()
    err = io.StringIO()
    with contextlib.ExitStack() as stack:
        for p in [*disk.patches(), *phase_patches(phase, fault, disk)]:
            stack.enter_context(p)
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            engine.run(cfg, run_dir)
        except BaseException:  # the record is what is judged, not how run() ended
            pass
    # Where the final record went, in the order RunFolder.finish tries the places when the
    # folder refuses it (results.json then keeps the stale running record).
    spare = fallback_path(run_dir)
    if spare.is_file():
        return json.loads(spare.read_text()).get("status"), "beside the folder"
    lines = [json.loads(x) for x in err.getvalue().splitlines() if x.startswith('{"')]
    if lines:
        return lines[-1].get("status"), "stderr"
    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text()).get("status"), "results.json"
    return "none", "lost"


def matrix() -> list[dict]:
    rows = []
    for (fault, phase), (status, where) in EXPECTED.items():
        with tempfile.TemporaryDirectory() as tmp:
            got = run_cell(fault, phase, Path(tmp))
        rows.append(
            {
                "fault": fault,
                "phase": phase,
                "expected": f"{status} ({where})",
                "actual": f"{got[0]} ({got[1]})",
                "verdict": "held" if got == (status, where) else "FAILED",
            }
        )
    return rows


def sweep_rows() -> list[dict]:
    rows = []
    for (fault, launcher), expected in SWEEP_EXPECTED.items():
        with tempfile.TemporaryDirectory() as tmp:
            got = run_sweep_cell(fault, launcher, Path(tmp))
        rows.append(
            {
                "fault": fault,
                "phase": launcher,
                "expected": expected,
                "actual": got,
                "verdict": "held" if got == expected else "FAILED",
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    held = sum(r["verdict"] == "held" for r in rows)
    lines = [
        "# Fault matrix of a training run",
        "",
        "Generated by `python experiments/fault_matrix.py` (model tiny, 3 steps, checkpoint every "
        "step); checked by tests/integration/test_fault_matrix.py. Each fault is injected once, "
        "when the run enters the phase; *where* is the place of the final record. The last "
        "rows are faults to a whole sweep (3 jobs through the CLI, the fault in the first job: "
        "experiments/fault_inject/): the tally it must end with and its exit status.",
        "",
        f"{held} of {len(rows)} cells held.",
        "",
        "| fault | phase | expected status (where) | actual status (where) | verdict |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['fault']} | {r['phase']} | {r['expected']} | {r['actual']} | {r['verdict']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def write_checked(doc, out: Path, argv, make_rows, render, held) -> int:
    """A generated table's command line (``--out``): make the rows, write the table, print the
    count held and each row that did not; exit 1 unless all held (also bad_inputs.py's)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=out, help="the Markdown table to write")
    args = p.parse_args(argv)
    rows = make_rows()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows))
    failed = [r for r in rows if not held(r)]
    print(f"{len(rows) - len(failed)} of {len(rows)} held -> {args.out}")
    for r in failed:
        print(f"  NOT HELD: {r}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return write_checked(
        __doc__, OUT, argv, lambda: matrix() + sweep_rows(), table, lambda r: r["verdict"] == "held"
    )


if __name__ == "__main__":
    sys.exit(main())

"""Train a model with one recomputation strategy and measure what it costs (memory, FLOPs, time):
``recompute-lab-train +strategy=full`` or ``python -m recompute_lab.train +strategy=full``;
results.json,
train.log and the W&B run go to the run's output dir (outputs/DATE/TIME;
multirun/DATE/TIME/N_OVERRIDES with -m).

Thin on purpose: Hydra composes conf/ against the schemas in recompute_lab.config, and
recompute_lab.run.engine
does the work. A configuration that composes but breaks a cross-field rule ends with a one-line
message and
exit status 2 in a single run; a run that ends oom / diverged / interrupted exits 1 after writing
its
results.json. Inside a multirun both are recorded in that job's results.json and the sweep goes on.

Under torchrun (``torchrun --nproc_per_node=2 -m recompute_lab.train parallel=fsdp``) every rank
runs this
file; only rank 0 creates the Hydra output dir, prints the summary and writes results.json
(recompute_lab.run.distributed.prepare_argv sends the other ranks' Hydra dirs to a temporary
folder).

Layer: cli.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from recompute_lab.cli import app
from recompute_lab.config import CONF_DIR, ConfigError

log = logging.getLogger("recompute_lab.cli.train")  # not __name__: "__main__" under python -m


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Imported here, after Hydra parsed the command line: --help and --cfg job need neither torch
    # nor the engine.
    from recompute_lab.record.logs import HeldFileLogs, route_warnings
    from recompute_lab.record.wandb_run import sweep_group
    from recompute_lab.run.distributed import env_rank

    route_warnings()  # one log line per warning, no source line
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # Jobs of one sweep share a W&B group named after the sweep folder (e.g. "2026-11-29_01-02-03").
    group = sweep_group(hc.sweep.dir) if multirun else None
    run_dir = Path(hc.runtime.output_dir)
    # train.log stays untouched until the run passes its folder's checks: a refused run must not
    # append to the log of the run that owns the folder (recompute_lab.record.logs.HeldFileLogs)
    held = HeldFileLogs()

    def started() -> None:  # the run passed its folder's lock and status checks
        held.run_started()
        if env_rank() == 0:  # rank 0 owns the output dir
            save_hydra_files(run_dir, cfg)

    if multirun and stop_sweep_on_signals():
        return None  # a signal stopped the sweep: the jobs after it are not run
    try:
        return run_job(cfg, run_dir, group, multirun, started)
    finally:
        held.close()  # what a refused run logged reached the console only


def stop_sweep_on_signals() -> bool:
    """In a sweep run by this process (Hydra's basic launcher): whether a SIGINT / SIGTERM has
    stopped it, counting this job as not run. The first call installs a handler that notes a
    signal arriving between jobs (each run installs its own while it runs, and a run it
    interrupts is recorded as such); the jobs after a signal are not run and the tally says so
    (it used to interrupt one job and start the next)."""
    import signal

    from recompute_lab.cli.callbacks import SWEEP_STOP
    from recompute_lab.run.failures import RECEIVED

    if not SWEEP_STOP.get("installed"):
        SWEEP_STOP["installed"] = True
        RECEIVED.clear()  # a signal before this sweep (another one in this process) is not its

        def note(signum, frame) -> None:
            RECEIVED["signal"] = signal.Signals(signum).name

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, note)
        except ValueError:  # not the main thread (a threaded launcher): signals stay Hydra's
            pass
    if "signal" not in RECEIVED:
        return False
    SWEEP_STOP["signal"] = RECEIVED["signal"]
    SWEEP_STOP["skipped"] = SWEEP_STOP.get("skipped", 0) + 1
    log.warning("recompute_lab: job skipped, the sweep was stopped by %s", RECEIVED["signal"])
    return True


def save_hydra_files(folder: Path, task_cfg: DictConfig) -> list[Path]:
    """Write Hydra's provenance files (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``)
    once the run has passed its folder's checks; returns the files written.

    conf/config.yaml sets ``hydra.output_subdir: null`` so that Hydra does not write them before
    the task starts: a run refused by the folder's lock or status would otherwise overwrite the
    provenance of the run that owns the folder. Nothing is written when a command names its own
    ``hydra.output_subdir`` (Hydra has written that one itself). Each file is replaced atomically
    (a planted symlink is replaced, not written through).
    """
    from omegaconf import OmegaConf

    from recompute_lab.record.fileio import atomic_write_text

    hc = HydraConfig.get()
    if hc.output_subdir is not None:
        return []
    out = Path(folder) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "config.yaml": task_cfg,
        "hydra.yaml": OmegaConf.create({"hydra": hc}),
        "overrides.yaml": hc.overrides.task,
    }
    for name, cfg in files.items():
        atomic_write_text(out / name, OmegaConf.to_yaml(cfg))
    return [out / name for name in files]


def run_job(cfg: DictConfig, run_dir: Path, group, multirun: bool, on_start) -> float | None:
    """The engine's run and how its end becomes the command's: the summary, the exit status (a
    single run) or the next job (a sweep)."""
    from recompute_lab.record.folder import RecordNotSaved
    from recompute_lab.record.results import format_summary
    from recompute_lab.run.distributed import env_rank
    from recompute_lab.run.engine import run

    try:
        results = run(cfg, run_dir, group=group, on_start=on_start)
    except RecordNotSaved:
        # RunFolder.finish has said on stderr where the record went; the command still fails
        if multirun:
            return None  # the tally counts the job's folder as not ok
        sys.exit(1)
    except ConfigError as e:
        log.error("recompute_lab: invalid configuration: %s", e)
        if multirun:
            # recorded in results.json; the rest of the sweep continues (the tally counts it)
            return None
        sys.exit(2)
    except KeyboardInterrupt as e:
        if multirun:  # recorded; the sweep stops after this job (stop_sweep_on_signals)
            log.error("recompute_lab: %s", e or "interrupted before the run started")
            return None
        # SIGINT / SIGTERM before the run started (the record says so where the folder was empty)
        log.error("recompute_lab: %s", e or "interrupted before the run started")
        sys.exit(1)
    except OSError as e:
        # disk full, a file-size limit, a folder made read-only: the record says so already;
        # the command ends with one line, not a traceback
        log.error("recompute_lab: %s: %s (recorded in %s)", type(e).__name__, e, run_dir)
        if multirun:
            return None
        sys.exit(1)
    except Exception as e:
        if not multirun:
            raise
        log.error(
            "recompute_lab: job %s failed: %s: %s (recorded in its results.json; the sweep goes "
            "on)",
            run_dir.name,
            type(e).__name__,
            e,
        )
        return None
    ok = results["status"] == "ok"
    if env_rank() == 0:
        summary = format_summary(results, run_dir / "results.json")
        print(summary, file=sys.stdout if ok else sys.stderr)
        log.debug("summary:\n%s", summary)  # into train.log (the console has it from print)
    if not ok and not multirun:
        sys.exit(
            1
        )  # a single run that failed fails the command; in a sweep the next job still runs
    return results["loss"]["final"]


def cli() -> None:
    """``python -m recompute_lab.train`` (and the ``recompute-lab-train`` console script)."""
    app.launch(
        main
        # launcher fixes and override checks before Hydra parses the command line
        # (recompute_lab.cli.app)
    )
    from recompute_lab.cli.callbacks import SWEEP_EXIT

    sys.exit(
        SWEEP_EXIT.pop("code", 0)
    )  # a multirun: 1 unless every job ended ok (analysis.callback.SweepTally)


if __name__ == "__main__":
    cli()

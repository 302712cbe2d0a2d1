"""Entry point: ``python -m recompute_lab.train +strategy=full`` (add ``-m`` and comma lists to sweep).

Thin on purpose: Hydra composes conf/ against the schemas in recompute_lab.config, and recompute_lab.engine
does the work. A configuration that composes but breaks a cross-field rule ends with a one-line message and
exit status 2 in a single run; a run that ends oom / diverged / interrupted exits 1 after writing its
results.json. Inside a multirun both are recorded in that job's results.json and the sweep goes on.

Under torchrun (``torchrun --nproc_per_node=2 -m recompute_lab.train parallel=fsdp``) every rank runs this
file; only rank 0 creates the Hydra output dir, prints the summary and writes results.json
(recompute_lab.distributed.prepare_argv sends the other ranks' Hydra dirs to a temporary folder).
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from recompute_lab.analysis.callback import SWEEP_EXIT
from recompute_lab.cli import check_overrides
from recompute_lab.config import CONF_DIR, ConfigError
from recompute_lab.distributed import env_rank, prepare_argv
from recompute_lab.engine import run
from recompute_lab.tracking import format_summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # Jobs of one sweep share a W&B group named after the sweep folder (e.g. "2026-11-29_01-02-03").
    group = "_".join(Path(hc.sweep.dir).parts[-2:]) if multirun else None
    run_dir = Path(hc.runtime.output_dir)
    try:
        results = run(cfg, run_dir, group=group)
    except ConfigError as e:
        print(f"recompute_lab: invalid configuration: {e}", file=sys.stderr)
        if multirun:
            return None  # recorded in results.json; the rest of the sweep continues (the tally counts it)
        sys.exit(2)
    except Exception as e:
        if not multirun:
            raise
        print(f"recompute_lab: job {run_dir.name} failed: {type(e).__name__}: {e} (recorded in its results.json; "
              "the sweep goes on)", file=sys.stderr)
        return None
    ok = results["status"] == "ok"
    if env_rank() == 0:
        print(format_summary(results, run_dir / "results.json"), file=sys.stdout if ok else sys.stderr)
    if not ok and not multirun:
        sys.exit(1)  # a single run that failed fails the command; in a sweep the next job still runs
    return results["loss"]["final"]


def cli() -> None:
    """``python -m recompute_lab.train`` (and the ``recompute-lab-train`` console script)."""
    sys.argv = prepare_argv(sys.argv)  # before Hydra parses it: --local_rank, non-zero ranks' output dirs
    try:
        check_overrides(sys.argv[1:])  # mistakes Hydra would accept or explain misleadingly
    except ConfigError as e:
        print(f"recompute_lab: invalid configuration: {e}", file=sys.stderr)
        sys.exit(2)
    main()
    sys.exit(SWEEP_EXIT.pop("code", 0))  # a multirun: 1 unless every job ended ok (analysis.callback.SweepTally)


if __name__ == "__main__":
    cli()

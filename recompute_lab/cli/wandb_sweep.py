"""W&B Sweeps over the training CLI: write a sweep config from Hydra-style sweep overrides, and run
its jobs.

    recompute-lab-wandb-sweep model=tiny,small '+strategy=none,full,selective' trainer.steps=50
    --out sweep.yaml
    wandb sweep sweep.yaml                  # prints the sweep id
    wandb agent ENTITY/PROJECT/SWEEP_ID     # on each machine, in the project's environment (its
                                            `python`)

The overrides are those of ``recompute-lab-train -m``: comma lists, choice(), range(), glob() of a
group and
interval() (random / bayes only) become W&B parameters; single values are fixed and go into the
command. Each W&B
parameter is named ``sweep.<Hydra key>`` (``sweep.model``, ``sweep.+strategy``,
``sweep.data.seq_len``): a bare
``model`` would be locked by the sweep in the run's W&B config and hide the run's own ``model``
section, which the
dashboards group by. The agent runs ``python -m recompute_lab.wandb_sweep run <fixed>
sweep.KEY=VALUE ...``, which
turns them back into Hydra overrides (``logger.mode=online``, one output dir per W&B run under
outputs/wandb_sweep/SWEEP_ID/) and calls the training CLI in the same process: the W&B run it opens
is the
sweep's run (the agent's WANDB_RUN_ID / WANDB_SWEEP_ID), with the full config, results.json mirror
and artifacts.

Layer: cli.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Any, Optional

PREFIX = "sweep."
FIXED_FOR_AGENTS = ["logger=wandb", "logger.mode=online"]  # a sweep's runs report to the W&B server
ARGS_MACRO = "${args_no_hyphens}"  # W&B's agent expands it to PARAM=VALUE per parameter


def _value(v: Any, text: str) -> Any:
    """A W&B parameter value that the agent's ``f"{name}={value}"`` turns back into the same Hydra
    value: numbers,
    booleans and words as themselves (so bayes / random can use them), lists and the like as Hydra
    text."""
    return v if isinstance(v, (bool, int, float, str)) else text


def parameters(overrides: list[str]) -> tuple[dict, list[str]]:
    """(W&B parameters for the swept overrides, the fixed overrides as written)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, IntervalSweep

    from recompute_lab.cli.app import user_groups

    params, fixed = {}, []
    for arg, o in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key = arg.split("=", 1)[0]
        if not o.is_sweep_override():
            fixed.append(arg)
            continue
        value = o.value()
        if isinstance(value, IntervalSweep):
            kind = (
                "int_uniform"
                if isinstance(value.start, int) and isinstance(value.end, int)
                else "uniform"
            )
            params[PREFIX + key] = {"distribution": kind, "min": value.start, "max": value.end}
        elif isinstance(value, Glob):
            options = user_groups().get(o.key_or_group, [])
            params[PREFIX + key] = {"values": value.filter(options)}
        else:
            params[PREFIX + key] = {
                "values": [
                    _value(v, t) for v, t in zip(o.sweep_iterator(), o.sweep_string_iterator())
                ]
            }
    return params, fixed


def build_sweep(
    overrides: list[str],
    method: str = "grid",
    metric: Optional[str] = None,
    goal: str = "minimize",
    project: Optional[str] = None,
    entity: Optional[str] = None,
    name: Optional[str] = None,
) -> dict:
    """The W&B sweep config (what ``wandb sweep`` reads) for Hydra-style ``overrides``."""
    params, fixed = parameters(overrides)
    if not params:
        raise ValueError(
            "nothing to sweep: give at least one override with several values (model=tiny,small)"
        )
    if method == "grid" and any("distribution" in p for p in params.values()):
        raise ValueError(
            "interval() needs --method random or bayes (a grid needs a list of values)"
        )
    if method == "bayes" and not metric:
        raise ValueError("--method bayes needs --metric (e.g. memory/peak_bytes/measured)")
    sweep: dict = {
        "name": name or "recompute_lab " + " ".join(overrides),
        "method": method,
        # informational: the command below runs it as -m
        "program": "recompute_lab/cli/wandb_sweep.py",
        "command": [
            "${env}",
            "${interpreter}",
            "-m",
            "recompute_lab.wandb_sweep",
            "run",
            *FIXED_FOR_AGENTS,
            *fixed,
            ARGS_MACRO,
        ],
        "parameters": params,
    }
    if metric:
        sweep["metric"] = {"name": metric, "goal": goal}
    if project:
        sweep["project"] = project
    if entity:
        sweep["entity"] = entity
    return sweep


def combinations(sweep: dict) -> list[dict]:
    """Every combination of a grid's values ({param: value}); for distributions, their bounds."""
    names, choices = [], []
    for key, p in sweep["parameters"].items():
        names.append(key)
        choices.append(p["values"] if "values" in p else [p["min"], p["max"]])
    return [dict(zip(names, c)) for c in itertools.product(*choices)]


def train_overrides(args: list[str]) -> list[str]:
    """The agent's arguments as Hydra overrides of recompute_lab.cli.train (``sweep.`` prefixes
    dropped)."""
    return [a[len(PREFIX) :] if a.startswith(PREFIX) else a for a in args]


def check(sweep: dict) -> None:
    """Compose the training config of each value of each parameter (the others at their first
    value), with the
    CLI's own checks: a misspelt key, a wrong type or an unknown option fails here, before W&B has a
    sweep."""
    from recompute_lab.cli.overrides import compose_run_config
    from recompute_lab.config import validate

    base = {
        k: (p["values"][0] if "values" in p else p["min"]) for k, p in sweep["parameters"].items()
    }
    command = sweep["command"]
    fixed = [a for a in command[command.index("run") + 1 :] if a != ARGS_MACRO]
    seen = set()
    for key, p in sweep["parameters"].items():
        for v in p.get("values", [p.get("min"), p.get("max")]):
            combo = {**base, key: v}
            args = train_overrides(fixed + [f"{k}={x}" for k, x in combo.items()])
            if tuple(args) not in seen:
                seen.add(tuple(args))
                validate(compose_run_config(args))


def run(args: list[str]) -> None:
    """What the agent starts for each W&B run: the training CLI with the translated overrides, in
    this process."""
    overrides = train_overrides(args)
    if not any(a.startswith("hydra.run.dir=") for a in overrides):
        sweep_id, run_id = (
            os.environ.get("WANDB_SWEEP_ID", "no-sweep"),
            os.environ.get("WANDB_RUN_ID", "run"),
        )
        overrides.append(f"hydra.run.dir=outputs/wandb_sweep/{sweep_id}/{run_id}")
    from recompute_lab.cli import train

    sys.argv = ["recompute-lab-train", *overrides]
    train.cli()


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        run(argv[1:])
        return 0
    from recompute_lab.cli.app import groups_text

    ap = argparse.ArgumentParser(
        prog="recompute-lab-wandb-sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="then: wandb sweep OUT, and wandb agent ENTITY/PROJECT/SWEEP_ID\n\n"
        "config groups (group=option, * = default):\n" + groups_text(),
    )
    ap.add_argument("overrides", nargs="+", help="Hydra overrides as for recompute-lab-train -m")
    ap.add_argument("--method", choices=["grid", "random", "bayes"], default="grid")
    ap.add_argument(
        "--metric",
        default=None,
        help="summary key to optimise (random / bayes), e.g. time/tokens_per_s",
    )
    ap.add_argument("--goal", choices=["minimize", "maximize"], default="minimize")
    ap.add_argument(
        "--project", default=None, help="W&B project (default: logger.project, recompute_lab)"
    )
    ap.add_argument("--entity", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", type=Path, default=Path("sweep.yaml"))
    ap.add_argument("--no-check", action="store_true", help="skip composing each value's config")
    args = ap.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        sweep = build_sweep(
            args.overrides,
            args.method,
            args.metric,
            args.goal,
            args.project or "recompute_lab",
            args.entity,
            args.name,
        )
        if not args.no_check:
            check(sweep)
    except (ValueError, HydraException, OmegaConfBaseException) as e:  # ConfigError is a ValueError
        print(f"recompute-lab-wandb-sweep: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    import yaml

    args.out.write_text(yaml.safe_dump(sweep, sort_keys=False))
    runs = len(combinations(sweep)) if args.method == "grid" else "open-ended"
    print(
        f"wrote {args.out} ({len(sweep['parameters'])} parameters, {runs} runs)\n"
        f"next: wandb sweep {args.out}   then, per machine: wandb agent ENTITY/PROJECT/SWEEP_ID"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

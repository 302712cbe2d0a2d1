"""``python -m recompute_lab.plan``: the entry point is recompute_lab/cli/plan.py.

Layer: cli (a `python -m recompute_lab.<command>` shim)."""

from recompute_lab.cli.plan import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()

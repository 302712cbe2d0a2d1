"""``python -m recompute_lab.train``: kept for users' scripts; the entry point is
recompute_lab/cli/train.py.

Layer: cli (a `python -m recompute_lab.<command>` shim)."""

from recompute_lab.cli.train import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()

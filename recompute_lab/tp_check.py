"""``python -m recompute_lab.tp_check``: kept for users' scripts; the entry point is
recompute_lab/cli/tp_check.py.

Layer: cli (a `python -m recompute_lab.<command>` shim)."""

from recompute_lab.cli.tp_check import main  # noqa: F401

if __name__ == "__main__":
    main()

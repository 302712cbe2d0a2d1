"""``python -m recompute_lab.wandb_sweep``: kept for users' scripts; the entry point is
recompute_lab/cli/wandb_sweep.py.

Layer: cli (a `python -m recompute_lab.<command>` shim)."""

import sys

from recompute_lab.cli.wandb_sweep import main

if __name__ == "__main__":
    sys.exit(main())

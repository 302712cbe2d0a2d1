"""``python -m recompute_lab.dashboard``: kept for users' scripts; the entry point is
recompute_lab/cli/dashboard.py.

Layer: cli (a `python -m recompute_lab.<command>` shim)."""

import sys

from recompute_lab.cli.dashboard import main

if __name__ == "__main__":
    sys.exit(main())

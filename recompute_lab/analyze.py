"""``python -m recompute_lab.analyze``: kept for users' scripts; the entry point is
recompute_lab/cli/analyze.py.

Layer: cli (a `python -m recompute_lab.<command>` shim)."""

import sys

from recompute_lab.cli.analyze import main

if __name__ == "__main__":
    sys.exit(main())

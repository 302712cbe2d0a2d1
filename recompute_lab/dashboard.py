"""``python -m recompute_lab.dashboard``: kept for users' scripts; the entry point is recompute_lab/cli/dashboard.py."""
from recompute_lab.cli.dashboard import main  # noqa: F401

if __name__ == "__main__":
    main()

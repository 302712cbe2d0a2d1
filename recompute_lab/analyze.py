"""``python -m recompute_lab.analyze``: kept for users' scripts; the entry point is recompute_lab/cli/analyze.py."""
from recompute_lab.cli.analyze import main  # noqa: F401

if __name__ == "__main__":
    main()

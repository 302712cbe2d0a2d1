"""``python -m recompute_lab.wandb_sweep``: kept for users' scripts; the entry point is recompute_lab/cli/wandb_sweep.py."""
from recompute_lab.cli.wandb_sweep import main  # noqa: F401

if __name__ == "__main__":
    main()

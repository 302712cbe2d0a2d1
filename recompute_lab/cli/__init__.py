"""cli/ — the command-line entry points (train, estimate, analyze, dashboard, wandb-sweep, tp-check)
as thin Hydra
or argparse apps, the checks on overrides before Hydra, and the sweep callbacks."""

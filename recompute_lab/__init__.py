"""recompute_lab: what each activation-recomputation strategy costs in memory and compute, measured
and predicted."""

__version__ = "0.1.0"

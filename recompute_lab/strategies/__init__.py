"""Activation-recomputation strategies: each one rewires how modules run, never what they compute.

One module per family, each next to its own typed options (registered for Hydra as
schema/strategy/NAME):

    base.py     Plan, Shape, the registry, option checks, apply_strategy
    wrap.py     the wrapping helpers (checkpoint a module / block group, torch_remat regions, SAC,
                offload)
    module.py   none, full, selective, layers, sqrt
    sac.py      op (per-op selective activation checkpointing)
    regions.py  regions (torch_remat)
    offload.py  offload
    budget/     budget: options, probe (cost model), solver

Importing this package registers every strategy. Adding one: a module with an options dataclass and
an
``@register`` apply function, plus conf/strategy/NAME.yaml (README, "How to add a strategy").
"""

# Registered on import, in this order (listings and error messages show strategies in it).
from recompute_lab.strategies import module  # noqa: F401  none, full, selective, layers, sqrt
from recompute_lab.strategies import sac  # noqa: F401  op
from recompute_lab.strategies import regions  # noqa: F401
from recompute_lab.strategies import offload  # noqa: F401
from recompute_lab.strategies import budget  # noqa: F401
from recompute_lab.strategies.base import (
    STRATEGIES,
    Plan,
    Shape,
    apply_strategy,
    label_of,
    option_names,
    parse_options,
    register,
    strategy_names,
)

__all__ = [
    "STRATEGIES",
    "Plan",
    "Shape",
    "apply_strategy",
    "label_of",
    "option_names",
    "parse_options",
    "register",
    "strategy_names",
]

"""Each built-in strategy's typed options and its short label for tables, and the label rule for any
record.

Layer: config (no torch). The options are schemas like the other groups' (Hydra stores each as
schema/strategy/NAME, which conf/strategy/NAME.yaml lists first), so a RunSpec's strategy is typed
and checked
at the config layer, and the analysis labels runs without importing the strategies (torch). The
strategies
themselves (recompute_lab.strategies) register their apply functions against these names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from recompute_lab.config.schema import (
    STRATEGY_OPTIONS,
    ConfigError,
    StrategyConfig,
    StrEnum,
    register_strategy_options,
    strategy_options_names,
)

# Strategy name -> its label rule (options dict -> short name); strategies without one get the
# generic rule.
STRATEGY_LABELS: dict[str, Callable[[dict], str]] = {}


def options_class(name: str, options: type = StrategyConfig) -> type:
    """``options`` with ``name`` as its default name: a strategy without options of its own gets a
    subclass of
    StrategyConfig whose ``name`` defaults to it (e.g. FullConfig)."""
    if options().name == name:
        return options
    return dataclasses.make_dataclass(
        f"{name.title().replace('_', '')}Config", [("name", str, name)], bases=(options,)
    )


def declare(
    name: str, options: type = StrategyConfig, label: Optional[Callable[[dict], str]] = None
) -> type:
    """Register strategy ``name``'s options (and label rule); returns the options class to register
    apply with."""
    existing = STRATEGY_OPTIONS.get(name)
    cls = (
        existing
        if existing is not None and (options is StrategyConfig or existing is options)
        else (options_class(name, options))
    )
    register_strategy_options(name, cls)
    if label is not None:
        STRATEGY_LABELS[name] = label
    return cls


@dataclass
class SelectiveConfig(StrategyConfig):
    name: str = "selective"
    modules: list[str] = field(
        default_factory=lambda: ["core_attn"]
    )  # any of core_attn | attn | mlp | norm


def selective_label(opts: dict) -> str:
    return f"selective[{'+'.join(map(str, opts.get('modules') or ['core_attn']))}]"


class LayerMethod(StrEnum):
    uniform = (
        "uniform"  # Megatron: consecutive chunks of num_layers blocks, each one checkpoint region
    )
    block = "block"  # Megatron: only the first num_layers blocks, each checkpointed on its own
    every = "every"  # torchtitan selective_ac_option=N: every N-th block checkpointed


@dataclass
class LayersConfig(StrategyConfig):
    name: str = "layers"
    method: LayerMethod = LayerMethod.block
    num_layers: int = 1  # uniform: chunk size; block: how many of the first blocks
    every: int = 2  # method=every: checkpoint every N-th block


def layers_label(opts: dict) -> str:
    keys = ("method", "every") if str(opts.get("method")) == "every" else ("method", "num_layers")
    return f"layers({','.join(f'{k}={opts.get(k)}' for k in keys)})"


@dataclass
class RegionsConfig(StrategyConfig):
    name: str = "regions"
    # Sub-regions that keep their activations; the rest rerun. Default: the op plan (save matmuls
    # and attention).
    save: list[str] = field(
        default_factory=lambda: ["attn.qkv", "attn.core", "attn.out", "mlp.fc", "mlp.proj"]
    )


@dataclass
class OpConfig(StrategyConfig):
    name: str = "op"
    save_ops: Optional[list[str]] = (
        None  # aten op names whose outputs are saved; None = matmuls + attention
    )
    every_other_mm: bool = False  # torchtitan's policy: every second projection matmul recomputed


DEFAULT_FRACTION = 0.5


class Objective(StrEnum):
    flops = "flops"  # minimise recompute FLOPs, then bytes moved by recomputed pointwise ops
    time = "time"  # minimise roofline recompute time (FLOPs / peak + pointwise bytes / bandwidth)


@dataclass
class BudgetConfig(StrategyConfig):
    name: str = "budget"
    budget_fraction: Optional[float] = DEFAULT_FRACTION  # fraction of `none`'s activation bytes
    budget_bytes: Optional[int] = None  # activation bytes allowed (overrides budget_fraction)
    device_memory_gb: Optional[float] = None  # whole step (model state + activations) in 1e9 bytes
    objective: Objective = Objective.flops  # what the plan minimises

    def check(self) -> None:
        if self.budget_bytes is not None and self.device_memory_gb is not None:
            raise ConfigError(
                "set one of strategy.budget_bytes and strategy.device_memory_gb, not both"
            )
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ConfigError(f"strategy.budget_bytes must be positive, got {self.budget_bytes}")
        gb = self.device_memory_gb
        if gb is not None and not (math.isfinite(gb) and gb > 0):
            raise ConfigError(f"strategy.device_memory_gb must be a finite number > 0, got {gb}")
        fraction = self.budget_fraction
        if fraction is not None and not 0 < fraction <= 1:  # NaN fails both comparisons
            raise ConfigError(f"strategy.budget_fraction must be in (0, 1], got {fraction}")


# Registered on import, in this order (listings and error messages show strategies in it).
for _name, _options, _label in (
    ("none", StrategyConfig, None),
    ("full", StrategyConfig, None),
    ("selective", SelectiveConfig, selective_label),
    ("layers", LayersConfig, layers_label),
    ("sqrt", StrategyConfig, None),
    ("op", OpConfig, None),
    ("regions", RegionsConfig, None),
    ("offload", StrategyConfig, None),
    ("budget", BudgetConfig, None),
):
    declare(_name, _options, _label)


def label_of(opts: Optional[dict]) -> str:
    """A short readable name for tables: 'full', 'selective[core_attn]', 'op(every_other_mm=True)'.

    Options that differ from the strategy's schema defaults are listed; a strategy may define its
    own label.
    Unknown (foreign or older) strategy names are shown as they are.
    """
    if not isinstance(opts, dict) or not opts.get("name"):
        return "none"  # the schema's default: nothing recomputed
    name = str(opts["name"])
    suffix = "+offload" if opts.get("offload") and name != "offload" else ""
    options = STRATEGY_OPTIONS.get(name)
    if options is None:
        return name + suffix
    try:
        if name in STRATEGY_LABELS:
            return STRATEGY_LABELS[name](opts) + suffix
        defaults = dataclasses.asdict(options())
        changed = [
            k
            for k in strategy_options_names(name)
            if k != "offload" and k in opts and opts[k] != _plain(defaults.get(k))
        ]
    except (
        TypeError,
        ValueError,
        AttributeError,
    ):  # options of the wrong shape (a hand-edited or foreign record)
        return name + suffix
    if not changed:
        return name + suffix
    return f"{name}({','.join(f'{k}={short(opts[k])}' for k in changed)}){suffix}"


def _plain(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v


def short(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(_plain(v))

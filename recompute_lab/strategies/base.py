"""What every recomputation strategy shares: the typed Plan it returns, the run shape it is given,
the registry.

A strategy is one function ``apply(model, opts, shape) -> Plan`` registered under its config name
with its own
options dataclass (a subclass of recompute_lab.config.StrategyConfig). Registration stores that
dataclass in
Hydra's ConfigStore as ``schema/strategy/NAME``, which ``conf/strategy/NAME.yaml`` lists first in
its defaults:
an option of another strategy is therefore a compose-time error. ``apply_strategy`` is the one entry
point every
consumer (engine, probe, FLOP count, estimate, budget probe) calls.

The Plan is what theory, flops, probe and analysis read, by field and never by strategy name;
``to_dict`` gives
the ``strategy`` section of results.json (schema_version 1 keys unchanged: ``regions`` there holds
the block
groups).

Layer: strategies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from recompute_lab.config import (
    ConfigError,
    StrategyConfig,
    strategy_options_names,
    unregister_strategy_options,
)
from recompute_lab.config.plan import Plan
from recompute_lab.config.spec import Shape, parse_strategy
from recompute_lab.config.strategies import declare, label_of, short  # noqa: F401  (re-exported)
from recompute_lab.model.gpt import GPT, Block
from recompute_lab.predict.module_plans import (  # noqa: F401  (re-exported)
    BLOCK_PARTS,
    check_names,
    check_range,
)
from recompute_lab.strategies.wrap import offload_saved_tensors


ApplyFn = Callable[[GPT, Any, Shape], Plan]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its options schema, how to apply it and, optionally, how to replay a
    plan."""

    name: str
    options: type
    apply: ApplyFn
    reapply: Optional[Callable[[GPT, Plan], Plan]] = (
        None  # default: apply again (deterministic strategies)
    )
    needs_attention: bool = False  # acts on submodules only transformer blocks have
    label: Optional[Callable[[dict], str]] = (
        None  # short name for tables; default: name(changed options)
    )


STRATEGIES: dict[str, Strategy] = {}


def register(
    name: str,
    options: type = StrategyConfig,
    *,
    needs_attention: bool = False,
    label: Optional[Callable[[dict], str]] = None,
    reapply: Optional[Callable[[GPT, Plan], Plan]] = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply`` as strategy ``name`` with its options dataclass (stored for Hydra as
    schema/strategy/NAME)."""
    if not (isinstance(options, type) and issubclass(options, StrategyConfig)):
        raise TypeError(f"strategy {name!r}: options must be a dataclass extending StrategyConfig")
    # The config layer owns the options schema (built-ins: recompute_lab.config.strategies; a
    # plugin's here).
    options = declare(name, options, label)

    def deco(fn: ApplyFn) -> ApplyFn:
        STRATEGIES[name] = Strategy(name, options, fn, reapply, needs_attention, label)
        return fn

    return deco


def unregister(name: str) -> None:
    """Remove strategy ``name`` from the registry and its schema from Hydra's ConfigStore (plugins,
    tests)."""
    STRATEGIES.pop(name, None)
    unregister_strategy_options(name)


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def lookup(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(
            f"unknown strategy {name!r}; valid strategies: {', '.join(sorted(STRATEGIES))}"
        )
    return STRATEGIES[name]


def option_names(name: str) -> list[str]:
    """The options of strategy ``name``: its own first, then those every strategy has (``name``
    excluded)."""
    lookup(name)
    return strategy_options_names(name)


def parse_options(cfg: Any) -> Any:
    """The strategy node of a config (dict, dataclass or None) as its strategy's typed options
    (recompute_lab.config.spec.parse_strategy: an unknown strategy or key, a wrong type and the
    options' own rules are ConfigErrors naming the valid choices)."""
    return parse_strategy(cfg)


# --- option checks shared by strategies
# ---------------------------------------------------------------------


def has_transformer_blocks(model: nn.Module) -> bool:
    return all(isinstance(b, Block) for b in model.blocks)


def is_hf(model: nn.Module) -> bool:
    """A Hugging Face model behind the model interface
    (recompute_lab.model.hf.adapter.HFCausalLM)."""
    return getattr(model, "family", None) is not None and hasattr(model, "hf")


def parts_of(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Which submodules of a block (names relative to it) play each canonical part (attn, attn.core,
    mlp,
    norm1, ...): a Hugging Face model's family map, the identity for recompute_lab's transformer
    blocks, none for
    toy blocks."""
    if is_hf(model):
        return model.parts
    return BLOCK_PARTS if has_transformer_blocks(model) else {}


def part_modules(model: nn.Module, part: str, strategy: str) -> tuple[str, ...]:
    """The relative module names playing ``part`` in each block, or a ConfigError saying what this
    model has."""
    parts = parts_of(model)
    if part in parts:
        return parts[part]
    if is_hf(model):
        fam = model.family
        have = ", ".join(p for p in BLOCK_PARTS if p in parts)
        if not parts:
            raise ConfigError(
                f"strategy {strategy!r} acts on named submodules of a decoder layer (attention, "
                f"MLP, norms), and "
                f"Hugging Face model_type {fam.name!r} has no submodule map (known families: gpt2 "
                f"= gpt2; llama = "
                f"llama, mistral, qwen2; model.hf.family=llama|gpt2 applies one to a model of that "
                f"structure). "
                f"Valid strategies for it: "
                f"{', '.join(n for n, s in STRATEGIES.items() if not s.needs_attention)}, "
                "and regions at block level (strategy.save=[])"
            )
        raise ConfigError(
            f"strategy {strategy!r} needs part {part!r}, which Hugging Face family {fam.name!r} "
            f"does "
            f"not have here (its parts: {have})"
        )
    raise ConfigError(
        f"strategy {strategy!r} needs transformer blocks (attention, MLP, norms); the "
        f"{model.cfg.arch} arch has none"
    )


def block_names(model: GPT) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


# --- the one entry point
# ----------------------------------------------------------------------------------------


def apply_strategy(
    model: GPT, cfg: Any, shape: Optional[Shape] = None, reuse: Optional[Plan] = None
) -> Plan:
    """Apply the strategy that ``cfg`` (a strategy node or options instance) names to ``model`` in
    place.

    ``shape``: the run's micro-batch and precision (needed by budget; default: the model's
    max_seq_len, batch 1,
    fp32). ``reuse``: a plan this run already solved (e.g. on the probe's model): it is replayed,
    not re-solved.
    Saved-tensor offload is installed last for any strategy with ``offload: true``.
    """
    opts = parse_options(cfg)
    spec = lookup(opts.name)
    if (
        spec.needs_attention and not parts_of(model) and not is_hf(model)
    ):  # HF families: the strategy says
        valid = ", ".join(n for n, s in STRATEGIES.items() if not s.needs_attention)
        raise ConfigError(
            f"strategy {spec.name!r} needs transformer blocks (attention, MLP, norms); the "
            f"{model.cfg.arch} arch has none. Valid strategies for it: {valid}"
        )
    shape = shape or Shape(1, int(model.cfg.max_seq_len))
    if reuse is not None and spec.reapply is not None:
        plan = spec.reapply(model, reuse)
    else:
        plan = spec.apply(model, opts, shape)
    if opts.offload or spec.name == "offload":
        offload_saved_tensors(model, plan)
    return plan

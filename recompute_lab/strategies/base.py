"""What every recomputation strategy shares: the typed Plan it returns, the run shape it is given, the registry.

A strategy is one function ``apply(model, opts, shape) -> Plan`` registered under its config name with its own
options dataclass (a subclass of recompute_lab.config.StrategyConfig). Registration stores that dataclass in
Hydra's ConfigStore as ``schema/strategy/NAME``, which ``conf/strategy/NAME.yaml`` lists first in its defaults:
an option of another strategy is therefore a compose-time error. ``apply_strategy`` is the one entry point every
consumer (engine, probe, FLOP count, estimate, budget probe) calls.

The Plan is what theory, flops, probe and analysis read, by field and never by strategy name; ``to_dict`` gives
the ``strategy`` section of results.json (schema_version 1 keys unchanged: ``regions`` there holds the block
groups).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from recompute_lab.config import ConfigError, StrategyConfig
from recompute_lab.model.gpt import GPT, Block
from recompute_lab.model.precision import make_precision
from recompute_lab.strategies.wrap import SUBREGIONS, offload_saved_tensors


@dataclass(frozen=True)
class RunShape:
    """The run a strategy is applied for: one micro-batch's shape and the precision policy.

    Strategies whose plan depends on activation sizes (budget) read it; the others ignore it.
    """

    batch: int
    seq: int
    precision: str = "fp32"
    fp32_grad_accum: bool = False

    @classmethod
    def of(cls, cfg: DictConfig) -> "RunShape":
        """The shape of the run that ``cfg`` (a whole composed config) describes."""
        return cls(int(cfg.data.batch_size), int(cfg.data.seq_len), str(cfg.precision.name),
                   bool(cfg.precision.get("fp32_grad_accum", False)))

    def _policy(self):
        return make_precision(OmegaConf.create({"name": self.precision, "fp32_grad_accum": self.fp32_grad_accum}))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in (autocast's, else the parameters')."""
        return self.autocast_dtype or self.param_dtype

    @property
    def param_dtype(self) -> torch.dtype:
        return self._policy().param_dtype

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The forward's autocast dtype (None: no autocast)."""
        return self._policy().autocast_dtype


@dataclass
class Plan:
    """What a strategy did to a model, as every other component reads it.

    recomputed        qualified names of modules whose forward reruns in backward (block groups: every block)
    saved             what stays saved for backward, in words or module names
    block_groups      whole-block checkpoint regions as lists of block indices (layers, sqrt, regions, ...)
    activation_reason why recompute_lab.predict.theory has no closed form for this plan (None: the module formula applies)
    flops_reason      why the module FLOP formula cannot predict the recompute FLOPs (None: it can)
    predicted_activation_bytes  the strategy's own prediction where theory has none (budget's probed cost model)
    details           strategy-specific figures (save_ops, chosen options, ...), merged into results.json
    """

    name: str
    description: str
    recomputed: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    block_groups: Optional[list[list[int]]] = None
    activation_reason: Optional[str] = None
    flops_reason: Optional[str] = None
    predicted_activation_bytes: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    offload: bool = False
    offload_effective: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The ``strategy`` section of results.json."""
        out: dict[str, Any] = {"name": self.name, "recomputed": list(self.recomputed), "saved": list(self.saved),
                               "description": self.description}
        if self.block_groups is not None:
            out["regions"] = [list(g) for g in self.block_groups]
        out.update(self.details)
        if self.predicted_activation_bytes is not None:
            out["predicted_activation_bytes"] = self.predicted_activation_bytes
        out.update(notes=list(self.notes), offload=self.offload, offload_effective=self.offload_effective,
                   warnings=list(self.warnings))
        return out


ApplyFn = Callable[[GPT, Any, RunShape], Plan]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its options schema, how to apply it and, optionally, how to replay a plan."""

    name: str
    options: type
    apply: ApplyFn
    reapply: Optional[Callable[[GPT, Plan], Plan]] = None  # default: apply again (deterministic strategies)
    needs_attention: bool = False  # acts on submodules only transformer blocks have
    label: Optional[Callable[[dict], str]] = None  # short name for tables; default: name(changed options)


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, options: type = StrategyConfig, *, needs_attention: bool = False,
             label: Optional[Callable[[dict], str]] = None,
             reapply: Optional[Callable[[GPT, Plan], Plan]] = None) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply`` as strategy ``name`` with its options dataclass (stored for Hydra as schema/strategy/NAME)."""
    if not (isinstance(options, type) and issubclass(options, StrategyConfig)):
        raise TypeError(f"strategy {name!r}: options must be a dataclass extending StrategyConfig")
    if options().name != name:  # e.g. StrategyConfig itself for strategies without options of their own
        options = dataclasses.make_dataclass(f"{name.title().replace('_', '')}Config", [("name", str, name)],
                                             bases=(options,))

    def deco(fn: ApplyFn) -> ApplyFn:
        STRATEGIES[name] = Strategy(name, options, fn, reapply, needs_attention, label)
        ConfigStore.instance().store(group="schema/strategy", name=name, node=options)
        return fn
    return deco


def unregister(name: str) -> None:
    """Remove strategy ``name`` from the registry and its schema from Hydra's ConfigStore (plugins, tests)."""
    STRATEGIES.pop(name, None)
    ConfigStore.instance().repo.get("schema", {}).get("strategy", {}).pop(f"{name}.yaml", None)


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def lookup(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid strategies: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def option_names(name: str) -> list[str]:
    """The options of strategy ``name``: its own first, then those every strategy has (``name`` excluded)."""
    shared = [f.name for f in dataclasses.fields(StrategyConfig) if f.name != "name"]
    own = [f.name for f in dataclasses.fields(lookup(name).options) if f.name not in shared and f.name != "name"]
    return own + shared


def parse_options(cfg: Any) -> Any:
    """The strategy node of a config (DictConfig, dict or dataclass) as its strategy's typed options instance.

    Keys the strategy does not have (e.g. ``+strategy=full strategy.num_layers=2`` forced in with a ``+``) are a
    ConfigError naming the valid ones; so are wrong types or Enum values.
    """
    if cfg is None:
        cfg = StrategyConfig()
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else (
        dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))
    spec = lookup(str(data.get("name", "none")))
    valid = option_names(spec.name)
    unknown = [k for k in data if k != "name" and k not in valid]
    if unknown:
        raise ConfigError(f"{', '.join(f'strategy.{k}' for k in unknown)} is not an option of strategy "
                          f"{spec.name!r}; its options: {', '.join(valid)}")
    try:
        opts = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec.options), data))
    except OmegaConfBaseException as e:
        raise ConfigError(f"strategy {spec.name!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    opts.check()
    return opts


def label_of(opts: Optional[dict]) -> str:
    """A short readable name for tables: 'full', 'selective[core_attn]', 'op(every_other_mm=True)'.

    Options that differ from the strategy's schema defaults are listed; a strategy may define its own label.
    Unknown (foreign or older) strategy names are shown as they are.
    """
    if not isinstance(opts, dict) or not opts.get("name"):
        return "none"  # the schema's default: nothing recomputed
    name = str(opts["name"])
    suffix = "+offload" if opts.get("offload") and name != "offload" else ""
    spec = STRATEGIES.get(name)
    if spec is None:
        return name + suffix
    try:
        if spec.label is not None:
            return spec.label(opts) + suffix
        defaults = dataclasses.asdict(spec.options())
        changed = [k for k in option_names(name) if k != "offload" and k in opts and opts[k] != _plain(defaults.get(k))]
    except (TypeError, ValueError, AttributeError):  # options of the wrong shape (a hand-edited or foreign record)
        return name + suffix
    if not changed:
        return name + suffix
    return f"{name}({','.join(f'{k}={short(opts[k])}' for k in changed)}){suffix}"


def _plain(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v


def short(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(_plain(v))


# --- option checks shared by strategies ---------------------------------------------------------------------

def check_names(kind: str, given: list[str], valid: list[str]) -> list[str]:
    """Reject names outside ``valid`` with a ConfigError that lists the valid ones; keep the order given."""
    unknown = [n for n in given if n not in valid]
    if unknown:
        raise ConfigError(f"unknown {kind} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(given))  # drop repeats


def check_range(key: str, value: int, n_layer: int) -> None:
    if not 1 <= value <= n_layer:
        raise ConfigError(f"strategy.{key}={value} is out of range for model.n_layer={n_layer}; "
                          f"valid values: 1..{n_layer}")


def has_transformer_blocks(model: nn.Module) -> bool:
    return all(isinstance(b, Block) for b in model.blocks)


# The canonical parts of a transformer block, as recompute_lab.model.gpt's Block names its own submodules.
BLOCK_PARTS = {p: (p,) for p in ("attn", "mlp", *SUBREGIONS)}


def is_hf(model: nn.Module) -> bool:
    """A Hugging Face model behind the model interface (recompute_lab.model.hf.adapter.HFCausalLM)."""
    return getattr(model, "family", None) is not None and hasattr(model, "hf")


def parts_of(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Which submodules of a block (names relative to it) play each canonical part (attn, attn.core, mlp,
    norm1, ...): a Hugging Face model's family map, the identity for recompute_lab's transformer blocks, none for
    toy blocks."""
    if is_hf(model):
        return model.parts
    return BLOCK_PARTS if has_transformer_blocks(model) else {}


def part_modules(model: nn.Module, part: str, strategy: str) -> tuple[str, ...]:
    """The relative module names playing ``part`` in each block, or a ConfigError saying what this model has."""
    parts = parts_of(model)
    if part in parts:
        return parts[part]
    if is_hf(model):
        fam = model.family
        have = ", ".join(p for p in BLOCK_PARTS if p in parts)
        if not parts:
            raise ConfigError(
                f"strategy {strategy!r} acts on named submodules of a decoder layer (attention, MLP, norms), and "
                f"Hugging Face model_type {fam.name!r} has no submodule map (known families: gpt2 = gpt2; llama = "
                f"llama, mistral, qwen2; model.hf.family=llama|gpt2 applies one to a model of that structure). "
                f"Valid strategies for it: {', '.join(n for n, s in STRATEGIES.items() if not s.needs_attention)}, "
                "and regions at block level (strategy.save=[])")
        raise ConfigError(f"strategy {strategy!r} needs part {part!r}, which Hugging Face family {fam.name!r} does "
                          f"not have here (its parts: {have})")
    raise ConfigError(f"strategy {strategy!r} needs transformer blocks (attention, MLP, norms); the "
                      f"{model.cfg.arch} arch has none")


def block_names(model: GPT) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


# --- the one entry point ----------------------------------------------------------------------------------------

def apply_strategy(model: GPT, cfg: Any, shape: Optional[RunShape] = None, reuse: Optional[Plan] = None) -> Plan:
    """Apply the strategy that ``cfg`` (a strategy node or options instance) names to ``model`` in place.

    ``shape``: the run's micro-batch and precision (needed by budget; default: the model's max_seq_len, batch 1,
    fp32). ``reuse``: a plan this run already solved (e.g. on the probe's model): it is replayed, not re-solved.
    Saved-tensor offload is installed last for any strategy with ``offload: true``.
    """
    opts = parse_options(cfg)
    spec = lookup(opts.name)
    if spec.needs_attention and not parts_of(model) and not is_hf(model):  # HF families: the strategy says
        valid = ", ".join(n for n, s in STRATEGIES.items() if not s.needs_attention)
        raise ConfigError(f"strategy {spec.name!r} needs transformer blocks (attention, MLP, norms); the "
                          f"{model.cfg.arch} arch has none. Valid strategies for it: {valid}")
    shape = shape or RunShape(1, int(model.cfg.max_seq_len))
    if reuse is not None and spec.reapply is not None:
        plan = spec.reapply(model, reuse)
    else:
        plan = spec.apply(model, opts, shape)
    if opts.offload or spec.name == "offload":
        offload_saved_tensors(model, plan)
    return plan

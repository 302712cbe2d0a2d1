"""The Hydra boundary: a composed config becomes one frozen, typed ``RunSpec``, and a run's shape
one ``Shape``.

Layer: config (the lowest; imports no torch). ``RunSpec.of(cfg)`` is called once per command, after
Hydra has
composed ``cfg``: it resolves ``model=hf`` (on a copy: the composed config is never mutated), checks
the
cross-field rules (recompute_lab.config.schema.validate) and the strategy's options, and converts
every group to
its schema dataclass (``OmegaConf.to_object``), then freezes them. Every layer below the CLI reads
the spec's
attributes (``spec.model.n_layer``, ``spec.data.seq_len``) as plain Python: no OmegaConf lookup
(17-36 us each)
on a hot path, no DictConfig below cli/ and config/.

``Shape`` is what a prediction or a strategy needs to know about one micro-batch of a run besides
the model:
batch, sequence, precision (hence the parameter / autocast byte widths), whose kernels (device), and
how the
model state is laid out over data-parallel ranks. It replaces four look-alike "setting" types.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recompute_lab.config.schema import (
    GROUPS,
    CompileConfig,
    ConfigError,
    DataConfig,
    EstimateConfig,
    Frozen,
    LoggerConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    StrategyConfig,
    TrainerConfig,
    strategy_options,
    strategy_options_names,
    validate,
)

# Bytes per element of the parameters (the residual stream) and of autocast's matmul outputs, per
# precision
# (recompute_lab.model.precision.POLICIES builds the same dtypes; tests/unit/test_spec.py checks
# they agree).
PARAM_BYTES = {"fp32": 4, "bf16_autocast": 4, "bf16_master": 2}
AUTOCAST_BYTES = {"bf16_autocast": 2}


@dataclass(frozen=True)
class Shape:
    """One micro-batch of a run as predictions and strategies see it (one rank of it under ddp /
    fsdp).

    batch, seq        the micro-batch (samples, tokens per sample)
    precision         fp32 | bf16_autocast | bf16_master; ``fp32_grad_accum``: bf16_master's fp32
                      grad buffers
    device            whose kernels decide what is saved (dropout-mask dtype, SDPA backend, fused
                      RMSNorm)
    grad_clip         clip_grad_norm_ runs before the optimizer step
    optimizer_impl    AdamW's for-loop | foreach | fused; None: what torch picks on ``device``
    parallel          none | ddp | fsdp, over ``world_size`` ranks; ``rank`` (fsdp: the last shards
                      may be short)
    """

    batch: int
    seq: int
    precision: str = "fp32"
    fp32_grad_accum: bool = False
    device: str = "cpu"
    grad_clip: bool = True
    optimizer_impl: Optional[str] = None
    parallel: str = "none"
    world_size: int = 1
    rank: int = 0

    @property
    def param_bytes(self) -> int:
        """4 fp32 / 2 bf16 parameters: the residual stream's dtype."""
        return PARAM_BYTES[self.precision]

    @property
    def autocast_bytes(self) -> Optional[int]:
        """2 under bf16 autocast, else None."""
        return AUTOCAST_BYTES.get(self.precision)

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of matmul outputs (autocast's dtype, else the parameters')."""
        return self.autocast_bytes or self.param_bytes

    @property
    def master_weights(self) -> bool:
        """MasterWeightAdamW keeps fp32 master weights (bf16_master without fsdp: FSDP keeps fp32
        shards)."""
        return self.precision == "bf16_master" and self.parallel != "fsdp"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def replace(self, **changes: Any) -> "Shape":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunSpec:
    """Everything a command was asked to do, typed and read-only (see the module docstring).

    ``strategy`` is the strategy's own options dataclass (a StrategyConfig subclass registered with
    the
    strategy); ``estimate`` is set for the estimate command only.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    estimate: Optional[EstimateConfig] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, freeze(value))
        if isinstance(
            self.data.seq_len, str
        ):  # a schema default built without Hydra: ${model.max_seq_len}
            object.__setattr__(
                self, "data", freeze(dataclasses.replace(self.data, seq_len=self.model.max_seq_len))
            )

    @classmethod
    def of(cls, cfg: "RunSpec | DictConfig | dict") -> "RunSpec":
        """The spec of a composed config (resolved, validated, typed, frozen); a RunSpec is returned
        as it is.

        Raises ConfigError for a config that composes but cannot describe a valid run."""
        if isinstance(cfg, RunSpec):
            return cfg
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        cfg = copy_config(cfg)
        from recompute_lab.config.hf import (
            resolve_model,
        )  # config layer; transformers only for hub configs

        resolve_model(cfg)  # model=hf: the model fields from the Hugging Face config (on our copy)
        validate(cfg)
        try:
            groups = {
                name: OmegaConf.to_object(typed(cfg[name], schema))
                for name, schema in SCHEMAS.items()
                if name in cfg
            }
        except OmegaConfBaseException as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        strategy = parse_strategy(cfg.get("strategy"))
        return cls(**groups, strategy=strategy)

    def replace(self, **changes: Any) -> "RunSpec":
        """A new spec with whole sections replaced, or ``section__field=value`` changes
        (model__n_layer=2)."""
        sections: dict[str, Any] = {}
        for key, value in changes.items():
            section, _, name = key.partition("__")
            if not name:
                sections[section] = value
                continue
            base = sections.get(section, getattr(self, section))
            sections[section] = dataclasses.replace(base, **{name: value})
        return dataclasses.replace(self, **sections)

    def shape(
        self, device: str = "cpu", parallel: str = "none", world_size: int = 1, rank: int = 0
    ) -> Shape:
        """The micro-batch shape of this run on ``device``'s kernels (one rank of ``parallel`` x
        ``world_size``)."""
        return Shape(
            batch=int(self.data.batch_size),
            seq=int(self.data.seq_len),
            precision=str(self.precision.name),
            fp32_grad_accum=bool(self.precision.fp32_grad_accum),
            device=str(device),
            grad_clip=self.optimizer.grad_clip > 0,
            parallel=str(parallel),
            world_size=int(world_size),
            rank=int(rank),
        )

    def to_dict(self) -> dict:
        """The resolved spec as plain JSON-able Python (Enums as their names): results.json's
        ``config``."""
        return {
            f.name: to_plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


# Each group's schema: a config rebuilt from a record's plain ``config`` (no schema attached) is
# typed with it.
SCHEMAS = {**{k: v for k, v in GROUPS.items() if k != "strategy"}, "estimate": EstimateConfig}


def typed(node: Any, schema: type) -> Any:
    """``node`` as a structured config of ``schema`` (as Hydra composes it; an untyped node is
    merged onto it)."""
    if OmegaConf.is_config(node) and OmegaConf.get_type(node) is schema:
        return node
    return OmegaConf.merge(OmegaConf.structured(schema), node)


def copy_config(cfg: DictConfig) -> DictConfig:
    """A deep copy of a composed config, schemas and flags kept: HF resolution and estimate's
    position fit write
    into the copy, never into the caller's config."""
    return copy.deepcopy(cfg)


def parse_strategy(node: Any) -> StrategyConfig:
    """The strategy node (DictConfig, dict, dataclass or None) as its strategy's typed options
    instance.

    Keys the strategy does not have (``+strategy=full strategy.num_layers=2`` forced in with a
    ``+``) are a
    ConfigError naming the valid ones; so are wrong types, Enum values and the options' own rules
    (``check``).
    """
    if node is None:
        node = StrategyConfig()
    if isinstance(node, DictConfig):
        data = OmegaConf.to_container(node, resolve=True)
    elif dataclasses.is_dataclass(node):
        data = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    else:
        data = dict(node)
    name = str(data.get("name", "none"))
    options = strategy_options(name)
    valid = strategy_options_names(name)
    unknown = [k for k in data if k != "name" and k not in valid]
    if unknown:
        raise ConfigError(
            f"{', '.join(f'strategy.{k}' for k in unknown)} is not an option of strategy "
            f"{name!r}; its options: {', '.join(valid)}"
        )
    try:
        opts = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(options), data))
    except OmegaConfBaseException as e:
        raise ConfigError(f"strategy {name!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    opts.check()
    return freeze(opts)


class FrozenDict(dict):
    """A dict that refuses changes (a spec's ``model.hf.overrides``); JSON and
    ``dataclasses.asdict`` see a dict."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a RunSpec is read-only: make a new one with RunSpec.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse


def freeze(obj: Any) -> Any:
    """Schema dataclasses made read-only in place (recompute_lab.config.schema.Frozen), lists as
    tuples."""
    if isinstance(obj, Frozen) and dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            object.__setattr__(obj, f.name, freeze(getattr(obj, f.name)))
        object.__setattr__(obj, "_frozen", True)
        return obj
    if isinstance(obj, list):
        return tuple(freeze(v) for v in obj)
    if isinstance(obj, dict) and not isinstance(obj, FrozenDict):
        return FrozenDict({k: freeze(v) for k, v in obj.items()})
    return obj


def config_key(obj: Any) -> str:
    """A schema dataclass's values as one string, for cache keys (JSON of :func:`to_plain`, keys
    sorted); memoised on a frozen one, which cannot change: the planners ask for the same model's
    key thousands of times."""
    memo = obj.__dict__.get("_config_key") if isinstance(obj, Frozen) else None
    if memo is None:
        memo = json.dumps(to_plain(obj), sort_keys=True, default=str)
        if isinstance(obj, Frozen) and obj.__dict__.get("_frozen"):
            obj.__dict__["_config_key"] = memo
    return memo


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and Enums as dicts, lists and names (JSON-able)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Enum):
        return obj.value
    return obj


def plain_config(cfg: Any) -> dict:
    """A RunSpec or a composed config as plain JSON-able Python: for the record of a run refused
    before its spec
    could be made (unresolvable interpolations are kept as written)."""
    if isinstance(cfg, RunSpec):
        return cfg.to_dict()
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        except OmegaConfBaseException:
            return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    return to_plain(cfg)


def from_plain(cls: type, data: dict) -> Any:
    """A schema dataclass from its plain form (``to_plain``'s output, e.g. a JSON cache key),
    frozen."""
    hints = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        f = hints[key]
        factory = f.default_factory
        default = factory() if factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_plain(type(default), value)
        kwargs[key] = value
    return freeze(cls(**kwargs))


def as_model_config(node: Any) -> ModelConfig:
    """A model config as its schema dataclass: a ModelConfig is returned as it is; a composed
    ``model`` node
    (tests and scripts build models from one) is converted once, here at the config layer."""
    if isinstance(node, ModelConfig):
        return node
    if isinstance(node, DictConfig):
        return freeze(OmegaConf.to_object(node))
    if isinstance(node, dict):
        return from_plain(ModelConfig, node)
    raise TypeError(f"expected a model config, got {type(node).__name__}")

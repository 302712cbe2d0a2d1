"""Typed configuration schemas for recompute_lab, registered in Hydra's ConfigStore.

Every config group (model, precision, data, optimizer, trainer, logger, strategy, parallel, compile)
has a dataclass
here.
The root schema is stored as ``recompute_lab_schema`` (outside every swept group, so that
``'+strategy=glob(*)'`` only finds real strategies) and ``conf/config.yaml`` lists it first in its
defaults. A misspelt key, a wrong type or a value outside an Enum therefore fails at compose time
with a
message from OmegaConf naming the valid values. Rules that span fields (``n_head`` divides
``d_model``,
``seq_len`` within the position table...) are checked by :func:`validate` before anything is built.

Layer: config (no torch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

# The Hydra config folder (conf/ at the repository root), for @hydra.main and the compose API alike.
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


class ConfigError(ValueError):
    """A configuration that composes but cannot describe a valid run (cross-field rules)."""


class Frozen:
    """Mixin of every schema dataclass: writable while Hydra composes and tests build one, read-only
    once a
    RunSpec holds it (recompute_lab.config.spec.freeze sets ``_frozen``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(
                f"cannot assign {type(self).__name__}.{name}: a RunSpec is "
                "read-only (make a new one with RunSpec.replace)"
            )
        object.__setattr__(self, name, value)


class StrEnum(str, Enum):
    """Enum whose members compare equal to their names, so ``cfg.model.norm == "rmsnorm"`` works."""

    def __str__(self) -> str:  # prints as "rmsnorm", not "Norm.rmsnorm"
        return self.value


class Arch(StrEnum):
    gpt = "gpt"  # decoder-only transformer
    toy_mlp = "toy_mlp"  # the seed notebook's Linear-ReLU-Linear blocks, no attention
    hf = "hf"  # a Hugging Face transformers causal LM (model=hf; recompute_lab.model.hf)


class Norm(StrEnum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Mlp(StrEnum):
    gelu = "gelu"  # exact erf GELU
    # GELU's tanh approximation (GPT-2, BERT; Hugging Face's gelu_new), one fused kernel
    gelu_tanh = "gelu_tanh"
    swiglu = "swiglu"


class Positions(StrEnum):
    learned = "learned"
    rope = "rope"


class Attention(StrEnum):
    # torch.nn.functional.scaled_dot_product_attention (flash/efficient kernels, no s^2 scores)
    sdpa = "sdpa"
    # explicit QK^T -> softmax -> dropout -> xV, stores the s^2 scores (Korthikanti's regime)
    eager = "eager"


class DataKind(StrEnum):
    synthetic = "synthetic"
    text = "text"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LoggerKind(StrEnum):
    wandb = "wandb"
    none = "none"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class HFConfig(Frozen):
    """``model=hf``: a Hugging Face transformers causal LM, built with ``from_config`` (random
    weights, nothing
    downloaded) unless ``weights`` is set. recompute_lab.model.hf.resolve_model fills the model's
    other fields from it."""

    config: Optional[str] = (
        None  # a shipped name (recompute_lab/assets/hf_configs), a config.json or its folder,
    )
    #                               or a hub model id (needs the network)
    overrides: dict[str, Any] = field(
        default_factory=dict
    )  # config keys to change: +model.hf.overrides.KEY=VALUE
    weights: Optional[str] = (
        None  # pretrained weights: a local folder with safetensors, or a hub id when online
    )
    family: Optional[str] = (
        None  # submodule map and theory to use (gpt2 | llama); None: from the model_type
    )
    model_type: Optional[str] = (
        None  # filled in by resolution (the config's model_type): the fields are resolved
    )


@dataclass
class ModelConfig(Frozen):
    name: str = "tiny"
    arch: Arch = Arch.gpt
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    n_kv_head: Optional[int] = None  # grouped-query attention (Llama 3); None = n_head
    d_ff: int = 256
    vocab_size: int = 256
    max_seq_len: int = 64  # size of the learned position table / RoPE horizon
    dropout: float = 0.0
    norm: Norm = Norm.layernorm
    mlp: Mlp = Mlp.gelu
    positions: Positions = Positions.learned
    bias: bool = True
    tie_embeddings: bool = True
    attention: Attention = Attention.sdpa
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    hf: HFConfig = field(default_factory=HFConfig)  # arch=hf only


@dataclass
class PrecisionConfig(Frozen):
    name: str = "fp32"  # fp32 | bf16_autocast | bf16_master (recompute_lab/model/precision.py)
    fp32_grad_accum: bool = (
        False  # bf16_master only: sum micro-batch grads in fp32 buffers (+4 B/param)
    )


@dataclass
class DataConfig(Frozen):
    kind: DataKind = DataKind.synthetic
    seq_len: int = "${model.max_seq_len}"  # type: ignore[assignment]  # tokens per sample
    batch_size: int = 8  # samples per micro-batch
    path: Optional[str] = None  # text file for kind=text; None = the bundled sample text
    seed: int = 1234


# The optimizers recompute_lab.model.precision builds (AdamW, or its fp32-master form): any other
# name would train with AdamW while the record said otherwise.
OPTIMIZERS = ("adamw",)


@dataclass
class OptimizerConfig(Frozen):
    name: str = "adamw"  # one of OPTIMIZERS
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class OverheadConfig(Frozen):
    """trainer.overhead: after training, the run's step timed against a baseline strategy's step,
    interleaved on
    the same batches in the same process, with a 95% interval (recompute_lab.measure.overhead,
    recompute_lab.measure.timing).
    Each round runs two steps of each arm; off: trainer.overhead.enabled=false."""

    enabled: bool = True
    baseline: str = (
        "none"  # any strategy name (its default options); the run's own strategy: skipped
    )
    min_rounds: int = 6  # rounds before the width test; >= 6 for a 95% interval
    max_rounds: int = 20  # cap on the rounds (4 steps each)
    target_ci_width: float = 0.05  # stop once (ci95_high - ci95_low) / ratio <= this
    max_seconds: float = 120.0  # cap on the measurement's wall time (0: no time cap)
    # Proportionate: the measurement's wall time is also capped at budget_fraction x the training
    # loop's wall time, but never below min_seconds (short runs still get their rounds); 0: off.
    # 0.5: a run spends most of its time training (a 20-step `small` run: 36 s of training, 37 s
    # of rounds at 1.0)
    budget_fraction: float = 0.5
    min_seconds: float = 10.0
    warmup_rounds: int = (
        1  # untimed rounds first (allocator, caches, SAC dispatch warm for both arms)
    )


@dataclass
class TrainerConfig(Frozen):
    steps: int = 100
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    device: Device = Device.auto
    num_threads: int = (
        1  # torch.set_num_threads, fixed so step times compare across machines and load;
    )
    # recorded in results.json env.num_threads; 0 = torch's default (every core)
    warmup_steps: int = 3  # steps excluded from the timing statistics
    progress: bool = True  # tqdm progress bar with loss and tokens/s
    deterministic: bool = False  # torch.use_deterministic_algorithms
    stop_on_nan: bool = (
        True  # end the run as "diverged" at the first non-finite loss or gradient norm
    )
    diverge_factor: float = (
        10.0  # end the run as "diverged" when the loss exceeds this x its first value; 0: off
    )
    checkpoint_every: int = 0  # save training state every N steps (0: only when interrupted)
    resume: Optional[str] = (
        None  # true: this run dir's checkpoint.pt; or a checkpoint file / run folder
    )
    # Guard: a run whose predicted peak exceeds this many GB (1e9 B) ends as oom before allocating
    # anything.
    # null: the device's own memory (CUDA: its total; CPU: physical RAM, or a lower cgroup / ulimit
    # -v cap).
    max_memory_gb: Optional[float] = None
    memory_guard: bool = True  # false: no guard at all
    probe: bool = (
        True  # one instrumented memory probe step before training (recompute_lab.measure.probe)
    )
    memory_snapshot: bool = (
        False  # CUDA: write memory_snapshot.pickle of the probe step (pytorch.org/memory_viz)
    )
    overhead: OverheadConfig = field(
        default_factory=OverheadConfig
    )  # paired time overhead vs a baseline


@dataclass
class LoggerConfig(Frozen):
    kind: LoggerKind = LoggerKind.wandb
    mode: WandbMode = WandbMode.offline  # online needs WANDB_API_KEY; without it offline is used
    project: str = "recompute_lab"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the sweep's folder name in multirun, else no group
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"


class ParallelKind(StrEnum):
    none = "none"  # one process
    # DistributedDataParallel: model state replicated on every rank, gradients all-reduced
    ddp = "ddp"
    # FSDP2 fully_shard (ZeRO-3): params, grads and optimizer state sharded over the ranks
    fsdp = "fsdp"


class Backend(StrEnum):
    auto = "auto"  # nccl on CUDA, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


@dataclass
class StrategyConfig(Frozen):
    """What every strategy's options share; each strategy extends it with its own typed options.

    The schema of strategy NAME is the dataclass registered with it (recompute_lab.strategies) and
    stored as
    ``schema/strategy/NAME``; ``conf/strategy/NAME.yaml`` lists it first in its defaults, so an
    option of another
    strategy fails at compose time. Omitting ``+strategy=...`` leaves this base: nothing recomputed.
    """

    name: str = "none"
    offload: bool = (
        False  # any strategy: saved tensors to host memory (torch.autograd.graph.save_on_cpu)
    )

    def check(self) -> None:
        """Rules on the option values alone (raise ConfigError), checked before anything runs; a
        strategy's
        options class overrides it. Rules that need the model (e.g. a block count) belong to its
        apply."""


class Target(StrEnum):
    cuda = "cuda"
    cpu = "cpu"


class PipeSchedule(StrEnum):
    one_f_one_b = (
        "1f1b"  # PipeDream-flush 1F1B (Narayanan et al. 2021): stage i keeps p - i micro-batches
    )
    # interleaved 1F1B with pp_virtual model chunks per rank (Narayanan et al. 2021)
    interleaved = "interleaved"


@dataclass
class LayoutConfig(Frozen):
    """estimate.layout: a 4D parallel layout whose per-GPU memory estimate predicts
    (recompute_lab.predict.layout).

    Why a node of ``estimate`` and not of ``parallel``: the trainer runs only what ``parallel``
    offers (ddp, fsdp
    under torchrun); tensor, pipeline and context parallelism exist here as per-rank predictions on
    the meta
    device, so they sit with the other options of the command that evaluates them. GPUs = tp x pp x
    cp x
    dp_shard x dp_replicate; data.batch_size is the micro-batch per pipeline micro-step.
    """

    tp: int = 1  # tensor-parallel degree: divides n_head, n_kv_head, d_ff and vocab_size
    sp: bool = True  # sequence parallelism (norms/dropouts sharded over tp along the sequence)
    pp: int = 1  # pipeline stages; n_layer not divisible: the first stages get one more layer
    pp_schedule: PipeSchedule = PipeSchedule.one_f_one_b
    pp_virtual: int = 1  # interleaved: model chunks per rank (v); pp x pp_virtual divides n_layer
    microbatches: Optional[int] = (
        None  # micro-batches per step (m); None: pp (the fewest that fill the pipe)
    )
    cp: int = 1  # context parallelism: the sequence split over cp ranks (divides seq_len)
    dp_shard: int = 1  # FSDP (ZeRO-3) shard degree of the model state
    dp_replicate: int = 1  # replicas of the sharded state (HSDP): more GPUs, same bytes per GPU
    # The card (recompute_lab.predict.devices): a preset (a100_40gb, h100_80gb, h200, ...: the total
    # torch reports), or its memory in GiB (2^30 B) or GB (1e9 B); at most one. None: no fit check.
    gpu: Optional[str] = None
    device_gib: Optional[float] = None
    device_gb: Optional[float] = None
    # The reserve a step may not use (None: devices.CONTEXT_GIB, COMM_GIB_PER_GROUP, FRAGMENTATION)
    reserve_context_gib: Optional[float] = None  # CUDA context, kernels, cuBLAS workspaces
    reserve_comm_gib: Optional[float] = None  # NCCL buffers per communicator (dimension > 1)
    reserve_fragmentation: Optional[float] = None  # allocator fragmentation, fraction of the peak


@dataclass
class EstimateConfig(Frozen):
    """``python -m recompute_lab.estimate``'s own options (estimate.*), outside the training
    config."""

    target: Target = Target.cuda  # whose kernels decide what is saved
    seq_lens: list[int] = field(
        default_factory=list
    )  # a series of sequence lengths; empty = data.seq_len
    out: str = "estimate.json"  # where the JSON goes (relative to the run's output dir)
    # Saved tensors are counted on a meta replica only where the theory has no closed form (op,
    # regions, offload, budget; the meta forward took 1.4 s of a Llama-3 405B estimate); true
    # counts them beside the theory's figure for every plan (measured == theory is the cross-check)
    cross_check: bool = False
    layout: LayoutConfig = field(
        default_factory=LayoutConfig
    )  # per-GPU under tp/sp/pp/cp/fsdp (all 1: off)


@dataclass
class ParallelConfig(Frozen):
    """Data parallelism (recompute_lab/run/distributed.py). Launch with torchrun; data.batch_size is
    per rank."""

    kind: ParallelKind = ParallelKind.none
    backend: Backend = Backend.auto
    dp_size: Optional[int] = (
        None  # ranks for predictions without processes; under torchrun: null or WORLD_SIZE
    )
    reshard_after_forward: bool = (
        True  # fsdp: free gathered params after forward (ZeRO-3); false: keep to backward
    )


class CompileBackend(StrEnum):
    off = "off"  # eager: nothing compiled (the default)
    aot_eager_decomp_partition = (
        "aot_eager_decomp_partition"  # AOTAutograd's min-cut partitioner, eager kernels
    )
    inductor = "inductor"  # the same partition, Inductor's generated kernels


class CompileScope(StrEnum):
    block = "block"  # each transformer block compiled on its own (torchtitan's per-block compile)
    model = "model"  # the whole model, loss included, as one graph


@dataclass
class CompileConfig(Frozen):
    """torch.compile as an axis (recompute_lab/measure/compiled.py), applied after the recomputation
    strategy and before
    DDP / FSDP (torchtitan's order: AC, compile, FSDP)."""

    backend: CompileBackend = CompileBackend.off
    memory_budget: Optional[float] = (
        None  # torch._functorch.config.activation_memory_budget in (0, 1]; null: default
    )
    scope: CompileScope = CompileScope.block


# The run config's groups and their schemas, in the order of conf/config.yaml
# (recompute_lab.config.spec.RunSpec
# holds one typed, frozen instance of each).
GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "precision": PrecisionConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "strategy": StrategyConfig,
    "parallel": ParallelConfig,
    "compile": CompileConfig,
}


# Each strategy's options dataclass, by strategy name: filled by recompute_lab.strategies.register
# (the strategy
# layer registers; the config layer owns the schemas, so a RunSpec's strategy options are typed
# here).
STRATEGY_OPTIONS: dict[str, type] = {}


def register_strategy_options(name: str, options: type) -> None:
    """Register ``options`` (a StrategyConfig subclass) as strategy ``name``'s schema, for Hydra
    too."""
    STRATEGY_OPTIONS[name] = options
    ConfigStore.instance().store(group="schema/strategy", name=name, node=options)


def unregister_strategy_options(name: str) -> None:
    STRATEGY_OPTIONS.pop(name, None)
    ConfigStore.instance().repo.get("schema", {}).get("strategy", {}).pop(f"{name}.yaml", None)


def strategy_options(name: str) -> type:
    """The options dataclass of strategy ``name`` (ConfigError naming the valid strategies)."""
    if name not in STRATEGY_OPTIONS:
        raise ConfigError(
            f"unknown strategy {name!r}; valid strategies: {', '.join(sorted(STRATEGY_OPTIONS))}"
        )
    return STRATEGY_OPTIONS[name]


def strategy_options_names(name: str) -> list[str]:
    """The options of strategy ``name``: its own first, then those every strategy has (``name``
    excluded)."""
    shared = [f.name for f in dataclasses.fields(StrategyConfig) if f.name != "name"]
    own = [
        f.name
        for f in dataclasses.fields(strategy_options(name))
        if f.name not in shared and f.name != "name"
    ]
    return own + shared


@dataclass
class PlanConfig(Frozen):
    """``python -m recompute_lab.plan``'s own options (plan.*): the cluster and the batch the
    advisor ranks layouts, strategies and micro-batches for (recompute_lab.predict.advisor)."""

    gpus: int = 8  # GPUs in all: tp x pp x cp x dp_shard
    gpu: str = "h100_80gb"  # a card preset (recompute_lab.predict.devices / step_time)
    global_batch: Optional[int] = None  # sequences per optimizer step; None: one per GPU
    micro_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # candidates
    strategies: list[str] = field(default_factory=lambda: ["none", "selective", "full"])
    max_pp: int = 16  # pipeline degrees tried: powers of two up to this
    top: int = 15  # rows shown
    explain: Optional[int] = None  # a row number: its full breakdown
    out: str = "plan.json"  # written in the run's output dir


def register_configs() -> None:
    """Store the schemas. Called on import so both @hydra.main and the compose API see them."""
    cs = ConfigStore.instance()
    # The root holds one typed node per group (not a Config node), so that estimate.yaml can add its
    # `estimate`
    # section on top of config.yaml; Hydra still closes the root after composing, and
    # recompute_lab.cli.overrides checks
    # root keys added with + before Hydra runs.
    cs.store(name="recompute_lab_schema", node={name: schema() for name, schema in GROUPS.items()})
    cs.store(name="recompute_lab_estimate_schema", node={"estimate": EstimateConfig})
    cs.store(name="recompute_lab_plan_schema", node={"plan": PlanConfig})
    for group, node in GROUPS.items():
        cs.store(group=f"schema/{group}", name="base", node=node)


register_configs()


def bounded_name(name: str, limit: int = 120) -> str:
    """``name`` if at most ``limit`` characters, else its head and a hash of the whole: job folder
    names stay
    readable and within the filesystem's 255-byte limit, and distinct names stay distinct."""
    name = str(name)
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: max(1, limit - 11)]}~{digest}"


if not OmegaConf.has_resolver("bounded"):  # conf/config.yaml's sweep subdir: ${bounded:${...},120}
    OmegaConf.register_new_resolver(
        "bounded", lambda name, limit=120: bounded_name(name, int(limit))
    )


def _in_range(name: str, value: float, low: float, high: Optional[float], closed: bool) -> None:
    """A finite float above ``low`` (or equal, when ``closed``) and at most ``high``; NaN and inf
    are refused."""
    ok = (
        math.isfinite(value)
        and (value >= low if closed else value > low)
        and (high is None or value <= high)
    )
    if not ok:
        bound = f"{'>=' if closed else '>'} {low:g}" + (
            f" and <= {high:g}" if high is not None else ""
        )
        raise ConfigError(f"{name} must be a finite number {bound}, got {value}")


def _positive(name: str, value: Any) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# The largest integer a size or seed may be: sizes are multiplied into byte counts in int64 (and
# float64, exact to 2**53); seeds go to torch.manual_seed / torch.Generator, which take an int64.
MAX_SIZE = 2**53
MAX_SEED = 2**63 - 1


def short_int(value: Any) -> str:
    """An integer for a message: a 4000-digit one as its first digits and its length."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def _bounded_ints(cfg: DictConfig) -> None:
    """Sizes below MAX_SIZE and seeds within [0, MAX_SEED]: larger ones used to end in an int64
    overflow traceback (issue 31, finding 9)."""
    m, d, t = cfg.model, cfg.data, cfg.trainer
    sizes = [(f"model.{n}", getattr(m, n, None)) for n in (*SIZE_FIELDS, "n_kv_head")]
    sizes += [("data.seq_len", d.seq_len), ("data.batch_size", d.batch_size)]
    sizes += [("trainer.steps", t.steps), ("trainer.grad_accum", t.grad_accum)]
    for name, value in sizes:
        if isinstance(value, int) and value > MAX_SIZE:
            raise ConfigError(
                f"{name}={short_int(value)} is too large: at most 2**53 ({MAX_SIZE:,})"
            )
    for name, value in (("trainer.seed", t.seed), ("data.seed", getattr(d, "seed", 0))):
        if isinstance(value, int) and not 0 <= value <= MAX_SEED:
            raise ConfigError(
                f"{name}={short_int(value)} is out of range: a seed is an integer in "
                f"[0, 2**63 - 1] ({MAX_SEED:,})"
            )


SIZE_FIELDS = ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "max_seq_len")


def validate(cfg: DictConfig) -> None:
    """Cross-field rules that a schema cannot express; raise ConfigError with a readable message."""
    m, d, t, o = cfg.model, cfg.data, cfg.trainer, cfg.optimizer
    _bounded_ints(cfg)
    if m.arch == Arch.hf and m.get("hf", {}).get("model_type") is None:
        raise ConfigError(
            "model=hf: the model fields come from the Hugging Face config; resolve them first "
            "(recompute_lab.model.hf.resolve_model(cfg), which the entry points call)"
        )
    for name in SIZE_FIELDS:
        _positive(f"model.{name}", getattr(m, name))
    if m.vocab_size < 2:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size}: a single token leaves nothing to predict (the loss "
            "is 0 from the first step); use at least 2 (byte text needs 256)"
        )
    for name in ("seq_len", "batch_size"):
        _positive(f"data.{name}", getattr(d, name))
    _positive("trainer.steps", t.steps)
    _positive("trainer.grad_accum", t.grad_accum)
    if t.warmup_steps < 0 or t.num_threads < 0 or t.checkpoint_every < 0:
        raise ConfigError(
            "trainer.warmup_steps, trainer.num_threads and trainer.checkpoint_every must be >= 0"
        )
    if m.d_model % m.n_head:
        divisors = [h for h in range(1, m.d_model + 1) if m.d_model % h == 0 and h <= 128]
        raise ConfigError(
            f"model.n_head={m.n_head} does not divide model.d_model={m.d_model}; "
            f"valid n_head values for this d_model: {divisors}"
        )
    if m.n_kv_head is not None and (m.n_kv_head <= 0 or m.n_head % m.n_kv_head):
        raise ConfigError(
            f"model.n_kv_head={m.n_kv_head} must be positive and divide model.n_head={m.n_head}"
        )
    if m.positions == Positions.rope and (m.d_model // m.n_head) % 2:
        raise ConfigError(
            f"rope needs an even head dim, got d_model/n_head = {m.d_model // m.n_head}"
        )
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
            f"(the position table); lower data.seq_len or raise model.max_seq_len"
        )
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    for name, value, low, high, closed in (
        ("optimizer.lr", o.lr, 0.0, None, False),
        ("optimizer.eps", o.eps, 0.0, None, False),
        ("optimizer.weight_decay", o.weight_decay, 0.0, None, True),
        ("optimizer.grad_clip", o.grad_clip, 0.0, None, True),  # 0 disables clipping
        ("optimizer.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0, True),
        ("model.rope_theta", m.rope_theta, 0.0, None, False),
        ("model.norm_eps", m.norm_eps, 0.0, None, False),
        ("trainer.diverge_factor", t.diverge_factor, 0.0, None, True),
    ):  # 0 disables the rule
        _in_range(name, value, low, high, closed)
    if t.max_memory_gb is not None:
        _in_range("trainer.max_memory_gb", t.max_memory_gb, 0.0, None, False)
    if o.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}")
    if o.name not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name={o.name!r} is not implemented; valid: {', '.join(OPTIMIZERS)}"
        )
    if d.kind == DataKind.text and m.vocab_size < 256:
        raise ConfigError(
            f"data=text uses byte tokens (vocab 256) but model.vocab_size={m.vocab_size}"
        )
    if len(o.betas) != 2 or not all(
        isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in o.betas
    ):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {list(o.betas)}")
    if (
        getattr(cfg, "parallel", None) is not None
    ):  # configs saved before the parallel group have none
        validate_parallel(cfg)
    if getattr(cfg, "compile", None) is not None:  # nor before the compile group
        validate_compile(cfg)


def validate_compile(cfg: DictConfig) -> None:
    """Cross-field rules for ``compile`` (part of validate)."""
    c = cfg.compile
    valid = ", ".join(b.value for b in CompileBackend)
    if str(c.backend) not in {b.value for b in CompileBackend}:
        raise ConfigError(f"compile.backend={c.backend!r} is not a backend; valid: {valid}")
    if c.memory_budget is not None:
        _in_range("compile.memory_budget", float(c.memory_budget), 0.0, 1.0, False)
        if c.backend == CompileBackend.off:
            raise ConfigError(
                f"compile.memory_budget={c.memory_budget} is the compiled partitioner's budget: it "
                f"needs compile.backend set to one of {valid.replace('off, ', '')} "
                "(compile=eager_partition or compile=inductor)"
            )
    if c.backend == CompileBackend.off and c.scope != CompileScope.block:
        raise ConfigError(
            f"compile.scope={c.scope} says what torch.compile compiles: it needs compile.backend "
            f"set to one of {valid.replace('off, ', '')} (compile=eager_partition or "
            "compile=inductor); with compile=off nothing is compiled"
        )
    if c.backend != CompileBackend.off and cfg.model.arch == Arch.hf:
        raise ConfigError(
            "compile.backend is supported for recompute_lab's own models (arch gpt, toy_mlp); "
            "model=hf runs with compile=off"
        )


def validate_layout_numbers(lay: Any) -> None:
    """estimate.layout's sizes and reserves, checked whether or not a layout is active: nan, inf
    or a negative size must never pass unseen (recompute_lab.predict.devices reads them)."""
    if lay is None:
        return
    for key, closed in (
        ("device_gib", False),
        ("device_gb", False),
        ("reserve_context_gib", True),
        ("reserve_comm_gib", True),
        ("reserve_fragmentation", True),
    ):
        value = getattr(lay, key, None)
        if value is not None:
            _in_range(f"estimate.layout.{key}", float(value), 0.0, None, closed)


def validate_parallel(cfg: DictConfig) -> None:
    """Cross-field rules for ``parallel`` (part of validate, so checked before any process
    starts)."""
    p = cfg.parallel
    if p.dp_size is not None and p.dp_size <= 0:
        raise ConfigError(f"parallel.dp_size must be a positive integer or null, got {p.dp_size}")
    if p.kind == ParallelKind.none and (p.dp_size or 1) != 1:
        raise ConfigError(f"parallel.dp_size={p.dp_size} needs parallel=ddp or parallel=fsdp")
    if p.kind == ParallelKind.none:
        return
    if cfg.precision.get("fp32_grad_accum", False):
        raise ConfigError(
            "precision.fp32_grad_accum=true is not supported with parallel=ddp|fsdp: under fsdp "
            "gradients are already reduce-scattered into fp32 shards; under ddp the fp32 "
            "accumulation hook would read gradients before DDP's all-reduce"
        )
    if cfg.trainer.checkpoint_every or cfg.trainer.resume not in (
        None,
        False,
        "",
        "false",
        "False",
    ):
        raise ConfigError(
            "trainer.checkpoint_every / trainer.resume are supported with parallel=none only "
            "(sharded checkpoints are not implemented)"
        )


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain JSON-able Python (Enums as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]

"""Where a Hugging Face model's config comes from, and how it fills recompute_lab's model config.

``model.hf.config`` names one of (tried in this order):
  a shipped config   recompute_lab/assets/hf_configs/NAME.json: the published shapes of llama3_8b,
                     llama3_70b,
                     mistral_7b (v0.1), qwen2_7b and gpt2 (124M), usable offline
  a local path       a config.json file, or a folder holding one (e.g. a downloaded model)
  a hub model id     e.g. meta-llama/Meta-Llama-3-8B: needs the network (and access to the
                     repository)

Then ``model.hf.overrides`` (any config key) and the shape fields a user set on the model config
(``model.n_layer``
-> ``num_hidden_layers``...; 0 means "from the config") change it. :func:`resolve_model` writes the
result back
into the model config (shapes, norm, mlp, positions, dropout...), so everything that reads
``cfg.model`` (data,
validation, theory, peak, FLOP formulas, results.json) sees the Hugging Face model's numbers. It is
idempotent.

transformers is an optional extra (``pip install -e '.[hf]'``): it is imported here only when a
config is loaded.

Layer: config (no torch).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from recompute_lab.config import Arch, ConfigError, ModelConfig
from recompute_lab.config.schema import short_int
from recompute_lab.config.hf_families import SHAPE_FIELDS, Family, family_for

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "hf_configs"
MIN_TRANSFORMERS = (5, 0)
INSTALL = "pip install -e '.[hf]' (or pip install 'transformers>=5.0')"


def require_transformers():
    """transformers, or a one-line ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"model=hf needs Hugging Face transformers, which is not installed: {INSTALL}"
        ) from None
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if version < MIN_TRANSFORMERS:
        raise ConfigError(
            f"model=hf needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (its decoder "
            f"layers return tensors), found {transformers.__version__}: {INSTALL}"
        )
    return transformers


def shipped() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def _from_json(path: Path):
    transformers = require_transformers()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested past the limit
        raise ConfigError(
            f"model.hf.config: cannot read {path}: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    model_type = data.pop("model_type", None) if isinstance(data, dict) else None
    if not model_type:
        raise ConfigError(
            f"model.hf.config: {path} has no model_type (not a transformers config.json)"
        )
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except Exception as e:  # an unknown model_type, a field of the wrong type, 0 heads...
        raise ConfigError(
            f"model.hf.config: {path} is not a usable {model_type} config: {_reason(e)}"
        ) from None


def _reason(e: BaseException) -> str:
    """An exception as one short line for a ConfigError (transformers' validation errors span
    several lines)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def load_config(source: Optional[str]):
    """The transformers config ``source`` names (shipped name, local file or folder, hub id)."""
    if not source:
        raise ConfigError(
            f"model=hf needs model.hf.config=<shipped name | path to config.json | hub id>; "
            f"shipped: {', '.join(shipped())}"
        )
    source = str(source)
    if (SHIPPED_DIR / f"{source}.json").is_file():
        return _from_json(SHIPPED_DIR / f"{source}.json")
    path = Path(source).expanduser()
    if path.is_file():
        return _from_json(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.hf.config: folder {path} holds no config.json")
        return _from_json(path / "config.json")
    transformers = require_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (
        Exception
    ) as e:  # offline, unknown id, gated repository, remote code: say what would work
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(
            f"model.hf.config={source!r} is not a shipped config ({', '.join(shipped())}), nor a "
            f"local file or "
            f"folder, and the Hugging Face hub could not provide it{offline}: {type(e).__name__}: "
            f"{str(e).splitlines()[0].rstrip('.') if str(e) else ''}. Offline, point "
            f"model.hf.config at a "
            "config.json (HF_HUB_OFFLINE=1 fails at once instead of retrying)"
        ) from None


def _plain(v: Any) -> Any:
    return (
        OmegaConf.to_container(v, resolve=True)
        if isinstance(v, DictConfig) or OmegaConf.is_list(v)
        else v
    )


def apply_overrides(config, overrides: dict) -> None:
    """Set config keys; a key the config does not have is refused (a typo would otherwise do
    nothing)."""
    have = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in overrides.items():
        rope = getattr(config, "rope_parameters", None)
        if key == "rope_theta" and isinstance(rope, dict) and not hasattr(config, key):
            config.rope_parameters = {
                **rope,
                "rope_theta": float(value),
            }  # transformers 5 keeps it there
            continue
        if key not in have and not hasattr(config, key):
            close = difflib.get_close_matches(key, sorted(have), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"model.hf.overrides.{key}: {type(config).__name__} has no key {key!r}{hint}"
            )
        setattr(config, key, _plain(value))


def shape_value(config, family: Family, fld: str) -> Optional[int]:
    key = family.keys.get(fld)
    if fld == "d_ff" and family.name == "gpt2":
        return config.n_inner or 4 * config.hidden_size
    if fld == "n_kv_head":
        kv = getattr(config, key, None) if key else None
        return None if kv in (None, config.num_attention_heads) else int(kv)
    value = getattr(config, key, None) if key else None
    return None if value is None else int(value)


def set_shape(config, family: Family, fld: str, value: Any) -> None:
    """Write recompute_lab shape field ``fld`` into the transformers config (head_dim kept
    consistent)."""
    key = family.keys.get(fld)
    if fld == "n_kv_head" and key is None:
        if value not in (None, config.num_attention_heads):
            raise ConfigError(
                f"model.n_kv_head={value}: Hugging Face family {family.name!r} has no "
                f"grouped-query "
                "attention"
            )
        return
    if key is None:
        raise ConfigError(
            f"model.{fld}: Hugging Face family {family.name!r} has no config key for it; set a key "
            f"of the config with +model.hf.overrides.KEY=VALUE"
        )
    if fld == "n_kv_head" and value is None:
        value = config.num_attention_heads
    if fld in ("d_model", "n_head") and getattr(config, "head_dim", None) is not None:
        hd_old = config.hidden_size // config.num_attention_heads
        if config.head_dim == hd_old:  # head_dim derived from the shape: keep it derived
            h = value if fld == "d_model" else config.hidden_size
            a = value if fld == "n_head" else config.num_attention_heads
            config.head_dim = h // a
    setattr(config, key, value)


def find_family(config, forced: Optional[str]) -> Family:
    return family_for(config.model_type, forced)


def hf_config(mcfg) -> tuple[Any, Family]:
    """The transformers config a (resolved or not) model config describes, and its family: the
    source config,
    then ``model.hf.overrides``, then every shape field that is set (non-zero), so a replica with
    another layer
    count or a longer position table (budget probe, estimate) is built from the same node."""
    config = load_config(mcfg.hf.config)
    overrides = dict(mcfg.hf.overrides or {})
    apply_overrides(config, overrides)
    family = find_family(config, getattr(mcfg.hf, "family", None))
    resolved = is_resolved(mcfg)
    for fld in SHAPE_FIELDS:
        value = getattr(mcfg, fld, None)
        if not resolved and value == 0:  # 0: from the config
            continue
        key = family.keys.get(fld)
        if key in overrides and shape_value(config, family, fld) != value and not resolved:
            raise ConfigError(
                f"model.{fld}={value} and model.hf.overrides.{key}={overrides[key]} disagree; set "
                f"one"
            )
        if shape_value(config, family, fld) != value:
            set_shape(config, family, fld, value)
    return config, family


def hf_config_checked(mcfg) -> tuple[Any, Family]:
    """hf_config, with a config that does not fit its family (model.hf.family=gpt2 on a Llama
    config: keys it lacks) refused in one line instead of an AttributeError."""
    try:
        return hf_config(mcfg)
    except (AttributeError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(
            f"model.hf.config={mcfg.hf.config}: its fields do not fit the family it is read as "
            f"({_reason(e)}); model.hf.family must match the config (null: from its model_type)"
        ) from None


def is_resolved(mcfg) -> bool:
    """Resolution ran: every field holds the model's value (0 layers is then a real count: budget's
    probe)."""
    return getattr(mcfg.hf, "model_type", None) is not None


DERIVED = (
    "norm",
    "mlp",
    "positions",
    "bias",
    "tie_embeddings",
    "dropout",
    "norm_eps",
    "rope_theta",
)


def mapped_fields(config, family: Family) -> dict:
    """recompute_lab model fields describing ``config`` (shapes always; the rest where the family
    knows them)."""
    out = {fld: shape_value(config, family, fld) for fld in SHAPE_FIELDS}
    if family.derived is not None:
        out.update(family.derived(config))
    else:
        drop = [
            getattr(config, k)
            for k in ("attention_dropout", "hidden_dropout", "dropout")
            if isinstance(getattr(config, k, None), (int, float))
        ]
        out["dropout"] = float(max(drop, default=0.0))
        out["tie_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    if out["d_ff"] is None:  # families without a map: the usual names of the MLP width
        width = next(
            (
                getattr(config, k)
                for k in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
                if isinstance(getattr(config, k, None), int)
            ),
            None,
        )
        out["d_ff"] = (
            width or 4 * out["d_model"]
        )  # unused without a map (no theory), the schema wants an integer
    return out


def name_of(source: str) -> str:
    """hf:<shipped name | folder or file stem | hub id>."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        return f"hf:{path.parent.name if path.name == 'config.json' else path.stem}"
    if path.is_dir():
        return f"hf:{path.name}"
    return f"hf:{source}"


def resolve_model(cfg: DictConfig | Any) -> None:
    """Fill a ``model=hf`` config's model fields from its Hugging Face config, in place (a whole run
    config or
    its ``model`` node). Fields the user set are written into the transformers config first (so they
    win);
    a derived field set by the user to another value than the config's is refused, naming the key to
    set."""
    mcfg = cfg.model if hasattr(cfg, "model") else cfg
    if str(mcfg.arch) != Arch.hf or getattr(mcfg.hf, "model_type", None) is not None:
        return  # not a Hugging Face model, or resolved already (a RunSpec's model is)
    config, family = hf_config_checked(mcfg)
    try:
        fields = mapped_fields(config, family)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:
        # e.g. model.hf.family=gpt2 on a Llama config: the family's keys are not in it
        raise ConfigError(
            f"model.hf.config={mcfg.hf.config}: the {family.name} family's fields do not fit this "
            f"{config.model_type} config ({_reason(e)}); model.hf.family must match the config "
            f"(null: from its model_type)"
        ) from None
    for fld in SHAPE_FIELDS:
        value = fields.get(fld)
        if value is not None and (not isinstance(value, int) or value <= 0 or value > 2**53):
            raise ConfigError(
                f"model.hf.config={mcfg.hf.config}: {family.keys.get(fld) or fld}="
                f"{short_int(value)} is not a "
                f"usable size (model.{fld} must be a positive integer of at most 2**53)"
            )
    defaults = ModelConfig()
    for fld in DERIVED:
        if fld not in fields:
            continue
        now, default = _plain(getattr(mcfg, fld, None)), getattr(defaults, fld)
        now, default = (v.value if hasattr(v, "value") else v for v in (now, default))
        if now != default and now != fields[fld]:
            raise ConfigError(
                f"model.{fld}={now} does not apply to model=hf ({type(config).__name__} has "
                f"{fields[fld]}); change the Hugging Face config with +model.hf.overrides.KEY=VALUE"
            )
    for fld, value in fields.items():
        mcfg[fld] = value
    if mcfg.name == "hf":
        mcfg.name = name_of(mcfg.hf.config)
    mcfg.hf.family = family.name if family.structure else None
    mcfg.hf.model_type = str(config.model_type)

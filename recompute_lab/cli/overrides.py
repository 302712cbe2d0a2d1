"""What the command-line entry points share: checks of the overrides before Hydra composes them, and
the
compose API with the same checks (for scripts and tests).

Hydra's own messages for two common mistakes mislead: an option of another strategy
(``+strategy=full strategy.num_layers=2``) gets "To append to your config use
+strategy.num_layers=2", and a
misspelt key added with ``+`` (``+stratgy=full``, ``+model.n_layr=8``) composes silently into a run
of something
else. ``check_overrides`` refuses both first, naming the valid choices (and the closest one).

Layer: cli.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Iterable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from omegaconf import DictConfig

from recompute_lab.config import CONF_DIR, GROUPS, ConfigError

# Root keys a run config has, besides the schema's groups: Hydra's own and the experiment presets.
EXTRA_ROOT_KEYS = ("hydra", "experiment")


def _closest(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _strategies_chosen(parsed: list) -> list[str]:
    """The strategy names a command line selects (sweeps and glob() included); none when +strategy
    is absent."""
    for o in parsed:
        if o.key_or_group == "strategy" and not o.is_delete():
            value = o.value()
            if isinstance(value, Glob):
                from recompute_lab.strategies import STRATEGIES  # torch: only for a glob

                return value.filter(list(STRATEGIES))
            if o.is_sweep_override():
                return [str(v) for v in o.sweep_string_iterator()]
            return [str(value)]
    return ["none"]


def check_overrides(overrides: Iterable[str], root_keys: Iterable[str] = ()) -> None:
    """Raise ConfigError for overrides that name a key the run config does not have (with the
    closest valid
    key) or an option of a strategy other than the one chosen (listing that strategy's options).

    ``overrides``: command-line arguments; flags (``-m``, ``--cfg``...) and bare words are skipped.
    ``root_keys``: further root keys an entry point accepts (estimate's ``estimate``).
    """
    items = [a for a in overrides if "=" in a and not a.startswith("-")]
    if not items:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except Exception:  # Hydra reports syntax errors itself, with its own pointer to the character
        return
    groups = GROUPS  # root key -> its schema dataclass
    roots = [*groups, *EXTRA_ROOT_KEYS, *root_keys]
    chosen = _strategies_chosen(parsed)
    _check_hf_fields(parsed)
    for o in parsed:
        key = o.key_or_group
        root, _, rest = key.replace("/", ".", 1).partition(
            "."
        )  # hydra/launcher=... names a group of hydra
        if root == "local":  # the machine-settings group (conf/local/, `optional local: default`)
            _check_local(o, rest)
            continue
        if root not in roots:
            raise ConfigError(
                f"unknown config key {key!r}{_closest(root, roots)}; valid root keys: "
                f"{', '.join(roots)}"
            )
        if root == "strategy" and rest:
            # the registry imports torch: only when a strategy option is set
            from recompute_lab.strategies import STRATEGIES, option_names

            option = rest.split(".")[0]
            for name in chosen:
                if name in STRATEGIES and option not in option_names(name):
                    raise ConfigError(
                        f"strategy.{option} is not an option of strategy {name!r}; its options: "
                        f"{', '.join(option_names(name))}{_closest(option, option_names(name))}"
                    )
        elif (
            rest
            and root in groups
            and dataclasses.is_dataclass(groups[root])
            and root != "strategy"
        ):
            fields = [f.name for f in dataclasses.fields(groups[root])]
            name = rest.split(".")[0]
            if name not in fields:
                raise ConfigError(
                    f"{root}.{name} is not a {root} option{_closest(name, fields)}; valid: "
                    f"{', '.join(fields)}"
                )


def _models_chosen(parsed: list) -> list[str]:
    """The model presets a command line selects (the default, tiny, when model= is absent)."""
    for o in parsed:
        if o.key_or_group == "model" and not o.is_delete():
            if o.is_sweep_override():
                return [str(v) for v in o.sweep_string_iterator()]
            return [str(o.value())]
    return ["tiny"]


def _check_hf_fields(parsed: list) -> None:
    """model.hf.* without model=hf does nothing (it used to be accepted silently); with model=hf
    the fields the Hugging Face config decides (norm, mlp, positions...) are changed in that
    config (+model.hf.overrides.KEY=VALUE), not on the model (model.norm=layernorm on a Llama
    config was accepted and ignored)."""
    from recompute_lab.config.hf import DERIVED
    from recompute_lab.config.hf_families import SHAPE_FIELDS

    if any(o.key_or_group.startswith("experiment") for o in parsed):
        return  # a preset may choose the model itself: the config rules check what it composes
    models = _models_chosen(parsed)
    for o in parsed:
        key = o.key_or_group
        if key.startswith("model.hf") and "hf" not in models:
            raise ConfigError(
                f"{key} applies to model=hf only (this command's model: {', '.join(models)}); "
                "add model=hf, or drop it"
            )
        field = key.partition(".")[2]
        if models == ["hf"] and key.startswith("model.") and field in DERIVED and not o.is_delete():
            raise ConfigError(
                f"{key}: with model=hf the Hugging Face config decides {field}; change that "
                f"config's key with +model.hf.overrides.KEY=VALUE (the model fields model=hf "
                f"takes: {', '.join(SHAPE_FIELDS)}, attention)"
            )


def _check_local(o, rest: str) -> None:
    """``local=NAME`` picks conf/local/NAME.yaml (``~local`` skips the hook): NAME must exist.
    The group is merged at the root (``# @package _global_``), so it has no keys of its own."""
    from pathlib import Path

    options = sorted(p.stem for p in (Path(CONF_DIR) / "local").glob("*.yaml"))
    if rest:
        raise ConfigError(
            f"local.{rest} is not a config key: `local` picks a file of conf/local/ "
            f"(local=NAME, one of: {', '.join(options)}); its settings apply at the root"
        )
    if o.is_delete():
        return
    names = (
        [str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [str(o.value())]
    )
    for name in names:
        if name not in options:
            raise ConfigError(
                f"local={name}: no conf/local/{name}.yaml; valid: {', '.join(options)} "
                f"(~local skips the hook){_closest(name, options)}"
            )


def compose_run_config(overrides: Iterable[str] = ()) -> DictConfig:
    """The config ``python -m recompute_lab.train OVERRIDES`` would run (checked, composed, not yet
    validated)."""
    overrides = list(overrides)
    check_overrides(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)

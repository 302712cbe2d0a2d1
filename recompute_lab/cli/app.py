"""What the Hydra entry points (train, estimate) share: the help text, the fast path to it, the
checks before Hydra.

Help is fast because nothing heavy is imported before Hydra has parsed the command line: this
module, the entry
modules and recompute_lab.config import only Hydra and OmegaConf (~0.15 s); torch, the strategies
and the engine
are imported by the task function, or before it when the command line names a strategy (its schema
must be in
Hydra's ConfigStore before composing). The help lists the groups of conf/ with their options, not
the internal
schema/* groups the structured configs live in (conf/hydra/help/recompute_lab.yaml uses the
resolvers below).

Layer: cli.
"""

from __future__ import annotations

import ast
import inspect
import string
import sys
from pathlib import Path
from typing import Callable, Iterable

import yaml
from omegaconf import OmegaConf, open_dict

from recompute_lab.config import CONF_DIR, ConfigError

PKG = Path(__file__).resolve().parent
# Flags after which Hydra prints something and exits without running the task.
INFO_FLAGS = (
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--shell-completion",
    "-sc",
)
# Groups not in conf/config.yaml's defaults list: a command appends them (+strategy=full,
# +experiment=fig1...).
APPENDED = ("strategy", "experiment")


def user_groups(conf_dir: str | Path = CONF_DIR) -> dict[str, list[str]]:
    """The config groups a user chooses from: conf/<group>/<option>.yaml, Hydra's own folder left
    out."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(Path(conf_dir).iterdir())
        if d.is_dir() and d.name != "hydra"
    }


def default_choices(conf_dir: str | Path = CONF_DIR, app: str = "") -> dict[str, str]:
    """group -> the option conf/config.yaml's defaults list picks (``optional local: default``
    included), then what conf/<app>.yaml overrides (plan: precision bf16_master)."""
    out: dict[str, str] = {}
    files = ["config.yaml"] + ([f"{app}.yaml"] if app else [])
    for name in files:
        path = Path(conf_dir) / name
        if not path.is_file():
            continue
        for item in yaml.safe_load(path.read_text()).get("defaults", []):
            if isinstance(item, dict):
                for key, value in item.items():
                    words = key.split()
                    if words[0] != "override" or name != "config.yaml":
                        out[words[-1]] = str(value)
    return out


# Config groups (and root keys) a command never reads: its --help leaves them out. estimate prices
# one step on the meta device (no W&B); plan ranks layouts and the strategies it enumerates itself
# (none of the training loop's, the strategy group's or the single-process parallel settings).
UNREAD = {
    "estimate": ("logger",),
    "plan": ("logger", "trainer", "strategy", "parallel", "compile", "experiment"),
}


def groups_text(app: str = "", conf_dir: str | Path = CONF_DIR) -> str:
    """One line per user group ``app`` reads: its options, the default marked with *, how to
    append or skip it."""
    chosen = default_choices(conf_dir, str(app))
    lines = []
    skip = UNREAD.get(str(app), ())
    for group, options in user_groups(conf_dir).items():
        if group in skip:
            continue
        shown = ", ".join(f"{o}*" if chosen.get(group) == o else o for o in options)
        if group in APPENDED:
            note = f"  (+{group}=NAME; none by default)"
        elif group == "local":
            present = chosen.get("local") in options
            note = (
                f"  (machine settings: conf/local/{chosen.get('local')}.yaml, git-ignored, "
                f"{'loaded' if present else 'absent'}; see example.yaml)"
            )
        else:
            note = ""
        lines.append(f"{group}: {shown or '-'}{note}")
    return "\n".join(lines) + "\n(* = the default)"


def app_doc(name: str) -> str:
    """The first paragraph of recompute_lab/<name>.py's docstring (read, not imported: no torch for
    --help)."""
    path = PKG / f"{name}.py"
    doc = ast.get_docstring(ast.parse(path.read_text())) if path.is_file() else None
    return (doc or f"recompute_lab {name}").split("\n\n")[0].replace("``", "")


OmegaConf.register_new_resolver("recompute_lab.groups", groups_text, replace=True)
OmegaConf.register_new_resolver("recompute_lab.app_doc", app_doc, replace=True)


def info_only(argv: Iterable[str]) -> bool:
    """Whether Hydra will only print (help, config, info) and exit."""
    return any(a in INFO_FLAGS or a.startswith(("--cfg=", "--info=")) for a in argv)


def names_strategy(argv: Iterable[str]) -> bool:
    """Whether an override touches the strategy (directly or through an experiment preset)."""
    return any("strategy" in a or "experiment" in a for a in argv if not a.startswith("-"))


def prepare(argv: list[str], root_keys: tuple[str, ...] = (), check: bool = False) -> list[str]:
    """Before Hydra parses ``argv`` (sys.argv): launcher fixes and override checks, unless the
    command only asks
    for help or the config without naming a strategy (then nothing heavy is imported; ``check``
    forces them).
    Exits 2 with a one-line message for overrides that Hydra would accept or explain misleadingly
    (recompute_lab.cli.overrides.check_overrides)."""
    if info_only(argv[1:]) and not names_strategy(argv[1:]) and not check:
        return argv
    from recompute_lab.cli.overrides import (
        check_overrides,
    )  # torch-free: the strategy registry only when a strategy option is checked
    from recompute_lab.run.ranks import prepare_argv

    argv = prepare_argv(argv)  # --local_rank, non-zero ranks' output dirs (torchrun)
    try:
        check_overrides(argv[1:], root_keys)
        check_output_dir(argv[1:])
    except ConfigError as e:
        print(f"recompute_lab: invalid configuration: {e}", file=sys.stderr)
        sys.exit(2)
    return argv


def output_dir_override(args: list[str]) -> tuple[str, str]:
    """(key, value) of the folder Hydra will create for ``args``: hydra.sweep.dir with -m,
    hydra.run.dir otherwise; the value is the last override of it, or "." (the default's folders,
    outputs/ and multirun/, are made in the working directory)."""
    key = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in args) else "hydra.run.dir"
    value = "."
    for a in args:
        if a.startswith(f"{key}="):
            value = a.split("=", 1)[1].strip("'\"")
    return key, value


def check_output_dir(args: list[str]) -> None:
    """Refuse, before Hydra creates it, an output folder that cannot be made: one under a file,
    under /proc, or in a folder this user cannot write (Hydra would end in a traceback). The
    fixed part of the path (before any ``${...}``) is checked: its nearest existing folder must
    take a new folder (a probe folder is made there and removed at once)."""
    import os
    import tempfile

    key, value = output_dir_override(args)
    fixed = value.split("${", 1)[0]
    path = Path(fixed or ".").expanduser()
    if not fixed.endswith("/") and "${" in value:
        path = path.parent  # a name part-way through an interpolation: its folder is fixed
    path = path.absolute()
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{key}={value}: {existing} is a file, not a folder, so the run's folder cannot be "
            f"made under it; choose another {key}"
        )
    try:
        probe = tempfile.mkdtemp(prefix=".recompute_lab-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(
            f"{key}={value}: cannot create a folder in {existing} ({reason}); choose a writable "
            f"{key} (or run from a writable folder)"
        ) from None


def help_text(config_name: str, job_name: str, overrides: list[str]) -> str:
    """``--help`` as Hydra prints it with conf/hydra/help/recompute_lab.yaml, from the compose API:
    Hydra's own
    --help also lists every config group (hydra/* and schema/* included) for a template that does
    not show them,
    which took ~0.8 s of the 1.1 s it needed here (2 idle cores)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name=job_name):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    template = cfg.hydra.help.template  # resolves the header, the group list and the footer
    with open_dict(cfg):
        del cfg["hydra"]
        for key in UNREAD.get(job_name, ()):
            cfg.pop(key, None)
    return string.Template(template).safe_substitute(
        CONFIG=OmegaConf.to_yaml(cfg), APP_CONFIG_GROUPS="", HYDRA_CONFIG_GROUPS="", FLAGS_HELP=""
    )


def launch(
    main: Callable[[], object], config_name: str = "config", root_keys: tuple[str, ...] = ()
) -> None:
    """Run a @hydra.main function (of ``config_name``) as a console script / ``python -m`` entry
    point."""
    argv = sys.argv
    if any(a in ("--help", "-h") for a in argv[1:]) and "--hydra-help" not in argv:
        overrides = [a for a in argv[1:] if not a.startswith("-")]
        if names_strategy(overrides):
            import recompute_lab.strategies  # noqa: F401  (registers the strategies' schemas)
        try:
            text = help_text(
                config_name, Path(inspect.getfile(inspect.unwrap(main))).stem, overrides
            )
        except Exception as e:  # a bad override: the checks' message if they have one, else Hydra's
            prepare(argv, root_keys, check=True)
            cause = f" ({e.__cause__})" if e.__cause__ else ""
            print(f"recompute_lab: invalid configuration: {e}{cause}", file=sys.stderr)
            sys.exit(1)
        print(text)
        sys.exit(0)
    sys.argv = prepare(argv, root_keys)
    import warnings

    # conf/hydra/launcher/joblib.yaml replaces the plugin's node of the same name on purpose (its
    # launcher survives a dead worker); Hydra 1.3 warns about the shared name on every sweep
    warnings.filterwarnings("ignore", message="\n?'hydra/launcher/joblib' is validated against")
    main()

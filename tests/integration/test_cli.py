"""The command-line entry points: --help (user groups only, fast: no torch), console scripts, the
`local` hook."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from recompute_lab.cli import app
from recompute_lab.config import CONF_DIR
from recompute_lab.config.spec import RunSpec

from conftest import ROOT, run_cli

USER_GROUPS = [
    "compile",
    "data",
    "experiment",
    "local",
    "logger",
    "model",
    "optimizer",
    "parallel",
    "precision",
    "strategy",
    "trainer",
]


@pytest.mark.parametrize("module", ["recompute_lab.cli.train", "recompute_lab.cli.estimate"])
def test_hydra_app_help_lists_the_user_groups_only(tmp_path, module):
    proc = run_cli(["--help"], cwd=tmp_path, module=module)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert (
        "schema/" not in out and "hydra/" not in out
    )  # Hydra's default help lists eight schema/* groups
    section = out.split("== Config groups")[1].split("== Config (")[0]
    listed = [line.split(":")[0] for line in section.splitlines()[1:] if ":" in line]
    unread = app.UNREAD.get(module.rsplit(".", 1)[1], ())
    assert listed == [g for g in USER_GROUPS if g not in unread]
    assert (
        "model: gpt2_small, hf, llama3_1b, llama3_405b, llama3_70b, llama3_8b, small, tiny*, "
        "toy_mlp" in out
    )
    assert "strategy: budget, full," in out and "+strategy=NAME" in out
    assert ("estimate:\n  target: cuda" in out) == (
        module == "recompute_lab.cli.estimate"
    )  # its own options
    assert not list(tmp_path.iterdir())  # --help creates no output dir


def test_help_imports_neither_torch_nor_the_engine():
    """Help is fast because the heavy imports wait for a run (1.1 s -> 0.2 s here, idle); checked by
    what is
    imported rather than by a wall time that a shared machine's load would make flaky."""
    code = (
        "import atexit, sys; atexit.register(lambda: print('heavy:', sorted(m for m in ('torch', "
        "'recompute_lab.run.engine', 'recompute_lab.strategies') if m in sys.modules)));"
        "sys.argv = ['recompute-lab-train', '--help']; from recompute_lab.cli.train import cli; "
        "cli()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("heavy: []")


def test_help_with_a_strategy_shows_its_options_and_bad_overrides_fail_cleanly(tmp_path):
    proc = run_cli(["--help", "+strategy=layers"], cwd=tmp_path)
    assert proc.returncode == 0 and "  method: block\n  num_layers: 1" in proc.stdout
    bad = run_cli(["--help", "model.n_layr=3"], cwd=tmp_path)
    assert (
        bad.returncode == 2
        and "did you mean 'n_layer'" in bad.stderr
        and "Traceback" not in bad.stderr
    )
    typed = run_cli(["--help", "model.n_layer=two"], cwd=tmp_path)
    assert typed.returncode == 1 and "n_layer" in typed.stderr and "Traceback" not in typed.stderr


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_cli(["--cfg", "job", "+strategy=full", "model=small"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "name: small" in proc.stdout and "name: full" in proc.stdout and "hydra:" not in proc.stdout
    )


@pytest.mark.parametrize(
    "module",
    ["recompute_lab.cli.analyze", "recompute_lab.cli.dashboard", "recompute_lab.cli.wandb_sweep"],
)
def test_argparse_entry_points_help(tmp_path, module):
    proc = run_cli(["--help"], cwd=tmp_path, module=module)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: recompute-lab-")


def test_console_scripts_point_at_the_entry_points():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {
        "recompute-lab-train",
        "recompute-lab-estimate",
        "recompute-lab-plan",
        "recompute-lab-analyze",
        "recompute-lab-dashboard",
        "recompute-lab-wandb-sweep",
        "recompute-lab-tp-check",
    }
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    # The Hydra apps' scripts go through recompute_lab.cli.app (checks before Hydra, fast help), not
    # bare @hydra.main.
    assert scripts["recompute-lab-train"] == "recompute_lab.cli.train:cli"
    assert scripts["recompute-lab-estimate"] == "recompute_lab.cli.estimate:cli"
    assert scripts["recompute-lab-plan"] == "recompute_lab.cli.plan:cli"


@pytest.fixture
def conf_copy(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    for extra in (conf / "local").glob(
        "*.yaml"
    ):  # only the tracked example: no developer's own settings
        if extra.name != "example.yaml":
            extra.unlink()
    yield conf
    GlobalHydra.instance().clear()


def _compose(conf, overrides=()):
    import recompute_lab.strategies  # noqa: F401  (strategy schemas)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_local_hook_is_optional_git_ignored_and_loses_to_the_command_line(conf_copy):
    assert _compose(conf_copy).trainer.steps == 100  # no local/default.yaml: nothing changes
    assert (
        _compose(conf_copy, ["local=example"]).trainer.steps == 100
    )  # the example is all comments
    (conf_copy / "local" / "default.yaml").write_text(
        "# @package _global_\ntrainer:\n  steps: 7\nlogger:\n  entity: my-team\n"
    )
    cfg = _compose(conf_copy)
    assert cfg.trainer.steps == 7 and cfg.logger.entity == "my-team"
    assert _compose(conf_copy, ["trainer.steps=3"]).trainer.steps == 3  # the command line wins
    assert _compose(conf_copy, ["~local"]).trainer.steps == 100  # skipped for one command
    assert (
        "local: default*, example  (machine settings: conf/local/default.yaml, git-ignored, loaded"
        in app.groups_text(conf_dir=conf_copy)
    )
    ignored = subprocess.run(["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=ROOT)
    tracked = subprocess.run(["git", "check-ignore", "-q", "conf/local/example.yaml"], cwd=ROOT)
    assert ignored.returncode == 0 and tracked.returncode == 1


def test_group_listing_reads_the_config_tree(conf_copy):
    groups = app.user_groups(conf_copy)
    assert list(groups) == USER_GROUPS and groups["local"] == ["example"]
    choices = app.default_choices(conf_copy)
    assert (
        choices["model"] == "tiny" and choices["local"] == "default" and "strategy" not in choices
    )


def test_warnings_become_one_log_line_without_source(caplog, monkeypatch):
    import logging
    import warnings

    from recompute_lab.record.logs import route_warnings

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    route_warnings()
    with caplog.at_level(logging.WARNING, logger="py.warnings"), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("offload moves nothing on CPU", UserWarning, stacklevel=1)
    assert caplog.messages == ["UserWarning: offload moves nothing on CPU"]
    assert "warnings.warn(" not in caplog.text  # the default display would print the source line


def test_readme_torchtitan_megatron_table_commands_are_valid():
    """Every `ours` cell of the AC-option table (docs/strategies.md) composes, validates and
    applies to
    a tiny model."""
    import re
    import shlex

    from recompute_lab.cli.overrides import compose_run_config
    from recompute_lab.config import validate
    from recompute_lab.model.gpt import build_model
    from recompute_lab.strategies import apply_strategy

    from docs_text import page, section

    table = section(page("strategies"), "## Coming from torchtitan or Megatron-LM").split("\n\n")[1]
    rows = [line.split(" | ")[-1] for line in table.splitlines()[2:]]
    assert len(rows) >= 12
    applied = set()
    for cell in rows:
        for code in [c for c in re.findall(r"`([^`]+)`", cell) if "=" in c and "strategy" in c]:
            overrides = shlex.split(code.replace("=N", "=2").replace("=F", "=0.5"))
            if overrides[0].startswith("strategy."):
                overrides = ["+strategy=full", *overrides]  # "with any strategy"
            cfg = compose_run_config(overrides)
            validate(cfg)
            if (
                cfg.strategy.name != "budget"
            ):  # the planner prices 23 options: composing is the check here
                apply_strategy(build_model(cfg.model, "cpu"), cfg.strategy, RunSpec.of(cfg).shape())
            applied.add(cfg.strategy.name)
    assert applied >= {
        "none",
        "full",
        "selective",
        "op",
        "layers",
        "budget",
        "regions",
        "offload",
        "sqrt",
    }


APPS = {
    "recompute_lab.cli.train": "config",
    "recompute_lab.train": "config",
    "recompute-lab-train": "config",
    "recompute_lab.cli.estimate": "estimate",
    "recompute_lab.estimate": "estimate",
    "recompute-lab-estimate": "estimate",
    "recompute_lab.cli.plan": "plan",
    "recompute_lab.plan": "plan",
    "recompute-lab-plan": "plan",
}  # command (module or console script) -> its primary config


def readme_commands():
    """(app, overrides) of every train / estimate / plan command in the bash blocks of README.md and
    docs/*.md, -m sweeps expanded into their
    jobs (comma lists, glob()), Hydra's own settings (hydra.*, hydra/launcher=...) left out."""
    import itertools
    import re
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    from docs_text import pages

    text = "\n".join(pages().values())
    # a fence may be indented (inside a list item); the block's lines are dedented with it
    for indent, block in re.findall(r"^( *)```bash\n(.*?)^ *```", text, re.S | re.M):
        block = "\n".join(ln[len(indent):] for ln in block.splitlines())
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            markers = [w for w in words if w in APPS]
            if not markers:
                continue
            app_name = APPS[markers[0]]
            args = [
                w
                for w in words[words.index(markers[0]) + 1 :]
                if not w.startswith("-") and not w.startswith(("hydra.", "hydra/"))
            ]
            choices = []
            for arg, o in zip(args, OverridesParser.create().parse_overrides(args)):
                key = arg.split("=", 1)[0]
                if not o.is_sweep_override():
                    choices.append([arg])
                elif isinstance(o.value(), Glob):
                    choices.append(
                        [f"{key}={v}" for v in o.value().filter(app.user_groups()[o.key_or_group])]
                    )
                else:
                    choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
            for combo in itertools.product(*choices):
                yield app_name, list(combo)


def test_readme_example_commands_compose_and_validate():
    """Every job of every train / estimate / plan example in README and docs/ is a valid run (a
    sweep over tiny at
    s=128 was not:
    tiny's position table stops at 64)."""
    import recompute_lab.strategies  # noqa: F401
    from recompute_lab.cli.overrides import check_overrides
    from recompute_lab.config import validate
    from recompute_lab.cli.estimate import fit_positions
    from recompute_lab.model.hf import resolve_model
    from recompute_lab.config.hf import shipped
    from recompute_lab.strategies import parse_options

    jobs = list(readme_commands())
    assert len(jobs) >= 25 and {a for a, _ in jobs} == {"config", "estimate", "plan"}
    # each distinct job once (57 jobs, 47 distinct): a Hydra compose is most of the time
    for app_name, job in dict.fromkeys((a, tuple(o)) for a, o in jobs):
        overrides = list(job)
        check_overrides(overrides, (app_name,) if app_name in ("estimate", "plan") else ())
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=app_name, overrides=overrides)
        if str(cfg.model.arch) == "hf" and cfg.model.hf.config not in shipped():
            # /path/to/model: a placeholder for the reader's own config; composing was the check
            continue
        resolve_model(
            cfg
        )  # model=hf: the fields from its Hugging Face config, as the entry points do
        if app_name == "estimate":
            fit_positions(
                cfg, cfg.estimate, []
            )  # estimate grows the meta position table to the longest sequence
        validate(cfg)
        parse_options(cfg.strategy)
    GlobalHydra.instance().clear()


def test_each_apps_help_lists_only_the_groups_it_reads(tmp_path):
    """estimate reads no W&B settings; plan reads none of the training loop's, the strategy
    group's or the single-process parallel settings, and defaults to bf16_master."""
    est = run_cli(["--help"], cwd=tmp_path, module="recompute_lab.estimate")
    plan = run_cli(["--help"], cwd=tmp_path, module="recompute_lab.plan")
    train = run_cli(["--help"], cwd=tmp_path)
    assert est.returncode == plan.returncode == train.returncode == 0
    lines = {name: p.stdout.splitlines() for name, p in (("est", est), ("plan", plan),
                                                          ("train", train))}
    assert any(ln.startswith("logger:") for ln in lines["train"])
    assert not any(ln.startswith("logger:") for ln in lines["est"])
    assert any(ln.startswith("optimizer:") for ln in lines["est"])  # its state is priced
    for group in ("logger:", "trainer:", "strategy:", "parallel:", "compile:"):
        assert not any(ln.startswith(group) for ln in lines["plan"]), group
    assert "precision: bf16_autocast, bf16_master*, fp32" in lines["plan"]
    assert "plan:" in plan.stdout  # its own options are in the config it prints

"""The package's shape: no import cycles (static graph, lazy imports included, and every module
importable on its
own in a fresh interpreter), and one source for every default (a YAML value never repeats its
schema's)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from recompute_lab.config import CONF_DIR
from recompute_lab.config.spec import RunSpec
from recompute_lab.strategies import STRATEGIES

PKG = Path(__file__).resolve().parents[2] / "recompute_lab"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (top level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m in known and m != name}


def test_no_import_cycles_in_the_package_graph():
    mods = modules()
    graph = {n: imports_of(n, p, set(mods)) for n, p in mods.items()}
    # A package's __init__ importing its own submodules is how a package is assembled, not a cycle,
    # as long as
    # no submodule imports the package __init__ back (checked: edges to a parent package count).
    for name in graph:
        graph[name] = {m for m in graph[name] if not (m.startswith(name + "."))}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, stack: list[str]) -> bool:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle.extend(stack[stack.index(m) :] + [n, m] if m in stack else [n, m])
                return True
            if state.get(m) is None and visit(m, stack + [n]):
                return True
        state[n] = 2
        return False

    for n in sorted(graph):
        if state.get(n) is None and visit(n, []):
            break
    assert not cycle, " -> ".join(cycle)


# Each project module imported first in a child forked from one interpreter that holds the
# third-party libraries
# but no recompute_lab module: an order-dependent cycle among our modules fails as in a fresh
# interpreter, at ~0.1 s
# per module instead of torch's ~1 s import in each of ~60 fresh interpreters.
FORK_IMPORTS = r"""
import os, sys, traceback
# third-party only: no project module is loaded here
import einops, hydra, numpy, omegaconf, torch, yaml
import gc
gc.freeze()  # the gc module's advice before forking: no fork's collections touch these pages
assert not [m for m in sys.modules if m.split(".")[0] == "recompute_lab"]
failed = []
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            __import__(name)
            os._exit(0)
        except BaseException:
            os.write(w, traceback.format_exc()[-800:].encode())
            os._exit(1)
    os.close(w)
    err = os.read(r, 4096).decode()
    os.close(r)
    if os.waitpid(pid, 0)[1]:
        failed.append(name + ": " + err)
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = list(modules())
    proc = subprocess.run(
        [sys.executable, "-c", FORK_IMPORTS, *names], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_the_import_check_fails_on_a_module_that_cannot_import_first(tmp_path):
    """The check above can fail: a two-module cycle that only works in one import order."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc import b\nX = 1\n")
    (pkg / "b.py").write_text(
        "from cyc.a import X\n"
    )  # importing a first: b finds a half-initialised, X missing
    proc = subprocess.run(
        [sys.executable, "-c", FORK_IMPORTS, "cyc.a", "cyc.b"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 1 and "cyc.a: " in proc.stdout and "cyc.b: " not in proc.stdout, (
        proc.stdout
    )


def schema_defaults(group: str) -> dict:
    node = typing.get_type_hints(RunSpec)[group]
    return {
        f.name: f.default for f in dataclasses.fields(node) if f.default is not dataclasses.MISSING
    }


@pytest.mark.parametrize(
    "group", ["precision", "data", "optimizer", "trainer", "logger", "parallel", "compile"]
)
def test_group_yamls_hold_no_value_their_schema_already_sets(group):
    defaults = schema_defaults(group)
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        repeated = {
            k: v
            for k, v in values.items()
            if k in defaults and k not in ("name", "kind", "backend") and _plain(defaults[k]) == v
        }
        assert not repeated, (
            f"{path.name} repeats its schema's defaults {repeated}: set them in one place"
        )


def test_strategy_yamls_take_every_option_from_their_schema():
    for path in sorted((Path(CONF_DIR) / "strategy").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        assert values == {"defaults": [f"/schema/strategy/{path.stem}@_here_", "_self_"]}, path.name
        assert path.stem in STRATEGIES


def _plain(v):
    return v.value if hasattr(v, "value") else v

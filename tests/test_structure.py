"""The package's shape: no import cycles (static graph, lazy imports included, and every module importable on its
own in a fresh interpreter), and one source for every default (a YAML value never repeats its schema's)."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from recompute_lab.config import CONF_DIR, Config
from recompute_lab.recompute import STRATEGIES

PKG = Path(__file__).resolve().parent.parent / "recompute_lab"


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
    # A package's __init__ importing its own submodules is how a package is assembled, not a cycle, as long as
    # no submodule imports the package __init__ back (checked: edges to a parent package count).
    for name in graph:
        graph[name] = {m for m in graph[name] if not (m.startswith(name + "."))}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, stack: list[str]) -> bool:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle.extend(stack[stack.index(m):] + [n, m] if m in stack else [n, m])
                return True
            if state.get(m) is None and visit(m, stack + [n]):
                return True
        state[n] = 2
        return False

    for n in sorted(graph):
        if state.get(n) is None and visit(n, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    def load(name: str) -> tuple[str, int, str]:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
        return name, proc.returncode, proc.stderr[-800:]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [r for r in pool.map(load, modules()) if r[1]]
    assert not failed, failed


def schema_defaults(group: str) -> dict:
    node = typing.get_type_hints(Config)[group]
    return {f.name: f.default for f in dataclasses.fields(node) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("group", ["precision", "data", "optimizer", "trainer", "logger", "parallel", "compile"])
def test_group_yamls_hold_no_value_their_schema_already_sets(group):
    defaults = schema_defaults(group)
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        repeated = {k: v for k, v in values.items()
                    if k in defaults and k not in ("name", "kind", "backend") and _plain(defaults[k]) == v}
        assert not repeated, f"{path.name} repeats its schema's defaults {repeated}: set them in one place"


def test_strategy_yamls_take_every_option_from_their_schema():
    for path in sorted((Path(CONF_DIR) / "strategy").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        assert values == {"defaults": [f"/schema/strategy/{path.stem}@_here_", "_self_"]}, path.name
        assert path.stem in STRATEGIES


def _plain(v):
    return v.value if hasattr(v, "value") else v

"""The package's layers: every module has a rank, and no module imports one of a higher rank (lazy
imports
included). predict/, analysis/ and config/ run without torch; only cli/ and config/ know OmegaConf.

The ranks, lowest first (a folder's __init__ docstring says what the folder is for):

    0 config      schemas, RunSpec / Shape / Plan, validation, HF config resolution (the Hydra
                  boundary)
    1 predict     closed forms from shapes alone
    2 model       the GPT, toy MLP, precision policies, data, HF adapter
    3 primitives  modules every layer above may use: saved-tensor accounting and allocator peaks
                  (measure.memory), hardware rates, paired-timing statistics, target kernels,
                  crash-safe files,
                  provenance, log lines, the exceptions a run ends with (run.failures)
    4 strategies  recomputation strategies (the budget planner prices its options with the
                  primitives)
    5 measure     measurements of a model under its strategy: probe, FLOP count, overhead, compiled
                  graphs, TP
    6 record      the results.json contract, run folder, W&B mirror
    7 run         the engine and what it drives: checkpoints, data parallelism, compiled steps
    8 analysis    reads records only
    9 cli         entry points (and the package's ``python -m`` shims)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from test_structure import imports_of
from test_structure import modules as package_modules

PRIMITIVES = (
    "measure.memory",
    "measure.hardware",
    "measure.timing",
    "measure.target_kernels",
    "record.fileio",
    "record.provenance",
    "record.logs",
    "run.failures",
)
RANKS = {
    "config": 0,
    "predict": 1,
    "model": 2,
    **{p: 3 for p in PRIMITIVES},
    "strategies": 4,
    "measure": 5,
    "record": 6,
    "run": 7,
    "analysis": 8,
    "cli": 9,
}
TORCH_FREE = (
    "config",
    "predict",
    "analysis",
    "record.results",
    "record.folder",
    "record.fileio",
    "record.provenance",
    "record.logs",
    "measure.timing",
)
OMEGACONF_ALLOWED = ("cli", "config")


def modules() -> dict[str, Path]:
    """Every module, named relative to the package ('' is recompute_lab/__init__.py)."""
    return {
        name.removeprefix("recompute_lab").removeprefix("."): path
        for name, path in package_modules().items()
    }


def rank(name: str) -> int:
    """The rank of a module named relative to the package ('' is the package itself)."""
    best = None
    for (
        prefix,
        r,
    ) in RANKS.items():  # the longest matching prefix wins (measure.memory before measure)
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, r)
    if best is not None:
        return best[1]
    if "." not in name:  # the package __init__ and the top-level `python -m recompute_lab.X` shims
        return max(RANKS.values())
    raise AssertionError(f"recompute_lab.{name} has no layer: add it to RANKS")


def project_imports(name: str, path: Path) -> set[str]:
    """Project modules (relative names) that ``name`` imports anywhere in its file (test_structure's
    walk)."""
    full = f"recompute_lab.{name}" if name else "recompute_lab"
    found = imports_of(full, path, set(package_modules()))
    return {m.removeprefix("recompute_lab").removeprefix(".") for m in found}


def upward_imports() -> list[str]:
    out = []
    for name, path in modules().items():
        for dep in sorted(project_imports(name, path)):
            if rank(dep) > rank(name):
                out.append(
                    f"recompute_lab.{name} (rank {rank(name)}) imports recompute_lab.{dep} (rank "
                    f"{rank(dep)})"
                )
    return out


def test_every_module_has_a_layer():
    for name in modules():
        rank(name)


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_layer_check_can_fail(monkeypatch):
    """Moving predict above model makes its HF theory's import of config ... still fine, but model's
    import of
    predict (model.hf registers the HF theory) an upward one: the check reports it."""
    monkeypatch.setitem(RANKS, "predict", 2)
    monkeypatch.setitem(RANKS, "model", 1)
    assert any("recompute_lab.model.hf" in line and "predict" in line for line in upward_imports())


def test_only_cli_and_config_know_omegaconf():
    """Below the CLI a run is a RunSpec: no module outside cli/ and config/ imports omegaconf or
    names DictConfig."""
    offenders = []
    for name, path in modules().items():
        if rank(name) == max(RANKS.values()) or name.split(".")[0] in OMEGACONF_ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mod = (node.module or "") if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if (mod is not None and mod.split(".")[0] == "omegaconf") or any(
                n.split(".")[0] == "omegaconf" for n in names
            ):
                offenders.append(f"{name}: imports omegaconf")
            if isinstance(node, ast.Name) and node.id in ("DictConfig", "OmegaConf"):
                offenders.append(f"{name}: {node.id}")
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and "DictConfig" in node.value
                and ":" not in node.value
            ):  # a string annotation (docstrings may name it)
                offenders.append(f"{name}: annotation {node.value!r}")
    assert offenders == []


TORCH_CHECK = r"""
import importlib, sys
bad = []
for name in sys.argv[1:]:
    importlib.import_module(name)
    if "torch" in sys.modules:
        bad.append(name)
        break
print(" ".join(bad))
"""


@pytest.mark.parametrize("group", TORCH_FREE)
def test_torch_free_layers_import_no_torch(group):
    names = [f"recompute_lab.{n}" for n in modules() if n == group or n.startswith(group + ".")]
    assert names
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_CHECK, *names], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"importing {proc.stdout.strip()} imports torch"


def test_every_module_states_its_layer():
    """Each module's docstring names its layer ("Layer: predict ..."), the one RANKS gives it."""
    for name, path in modules().items():
        if name == "" or path.name == "__init__.py":
            continue  # a folder's __init__ docstring says what the folder is for
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        layer = doc.split("Layer: ", 1)[1].split()[0].rstrip(".,") if "Layer: " in doc else None
        expected = name.split(".")[0] if "." in name else "cli"
        assert layer == expected, f"recompute_lab.{name}: states layer {layer!r}, not {expected!r}"

"""The documentation site (mkdocs.yml, docs/*.md) builds strictly, every page is in its nav, the
project
structure tree on the contributing page names files that exist, and README stays one screen with
the planning
command on it. What the pages quote is checked by the tests of the code it comes from
(docs_text.py's users);
their commands are composed by tests/integration/test_cli.py."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import yaml

from docs_text import DOCS, ROOT, page, section


def test_mkdocs_build_is_strict_clean(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (pip install -e '.[dev]' installs it)")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "figures" / "fig1_activation_vs_context.png").exists()


def nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += nav_files(value) if isinstance(value, list) else [value]
    return out


def test_every_page_is_in_the_nav_and_the_nav_names_pages():
    # mkdocs.yml has no Python tags; a plain YAML load reads it
    nav = nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert sorted(nav) == sorted(p.name for p in DOCS.glob("*.md"))
    assert len(nav) >= 13


def test_readme_is_one_screen_with_the_planning_command_and_links_to_every_page():
    readme = page("readme").splitlines()
    assert len(readme) <= 80, len(readme)
    first_screen = "\n".join(readme[:40])
    assert (
        "recompute-lab-plan model=llama3_8b data.seq_len=8192 plan.gpus=8 plan.gpu=h100_80gb"
        in first_screen
    )
    assert "pip install -e '.[dev]' && recompute-lab-train +strategy=full" in first_screen
    assert "python -m pytest -q" in first_screen
    for p in DOCS.glob("*.md"):
        if p.name != "index.md":
            assert f"(docs/{p.name})" in "\n".join(readme), p.name


def test_the_project_structure_tree_names_what_exists():
    """Every folder and file the tree on docs/contributing.md names (first column) exists."""
    tree = section(page("contributing"), "## Project structure").split("```")[1]
    checked, base, sub = 0, ROOT, ROOT
    for line in tree.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent > 4:
            continue  # blank, or a description's continuation line
        for name in line.split():
            if not re.fullmatch(r"[\w.-]+/?(?:[\w.-]+/?)*", name) or not (
                name.endswith("/") or "." in name
            ):
                break  # the description starts
            if name == "..." or "NAME" in name:
                continue
            path = {0: ROOT, 2: base, 4: sub}[indent] / name
            assert path.exists(), f"the tree names {path.relative_to(ROOT)}, which does not exist"
            checked += 1
            if indent == 0 and name.endswith("/"):
                base = path
            elif indent == 2 and name.endswith("/"):
                sub = path
    assert checked >= 30, checked

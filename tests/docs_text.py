"""Where the documentation lives, for the tests that check what it says: README.md (one screen) and
the
pages of the mkdocs site, docs/*.md (mkdocs.yml's nav). Each check reads the page its content is
on."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def page(name: str) -> str:
    """The text of docs/NAME.md (``"readme"``: README.md)."""
    return (ROOT / "README.md" if name == "readme" else DOCS / f"{name}.md").read_text()


def pages() -> dict[str, str]:
    """README.md and every page of docs/ (not the figures docs/figures links to), by name."""
    out = {"readme": page("readme")}
    out.update({p.stem: p.read_text() for p in sorted(DOCS.glob("*.md"))})
    return out


def section(text: str, heading: str) -> str:
    """The part of ``text`` under the Markdown heading line ``heading`` (e.g. ``"## Memory-budget
    planning"``), up to the next heading of the same or a higher level; `#` lines inside code
    fences are
    not headings."""
    level = len(heading.split(" ", 1)[0])
    lines = text.split("\n")
    assert heading in lines, f"no heading {heading!r}"
    out, fenced = [], False
    for line in lines[lines.index(heading) + 1 :]:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            marks = len(line) - len(line.lstrip("#"))
            if marks <= level and line[marks : marks + 1] == " ":
                break
        out.append(line)
    return "\n".join(out)

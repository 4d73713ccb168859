"""The user documentation cannot rot: every Python sample in it runs.

Each fenced ```python block of README.md and of every page under docs/
(sub-folders included) is a complete script. It is written to a temporary
directory and run there with this interpreter; it must exit with status 0.
Blocks meant as fragments are fenced ```text. The README's API table, the
relative links of every page and the site's navigation (mkdocs.yml) are
checked against the package and the file tree. `make docs` builds the site
itself, with warnings as errors; `make test` runs it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import asyncflow

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
MKDOCS = REPO / "mkdocs.yml"


def excluded_from_site() -> list[str]:
    """The patterns of mkdocs.yml's ``exclude_docs: |`` block."""
    lines = MKDOCS.read_text(encoding="utf-8").splitlines()
    if "exclude_docs: |" not in lines:
        return []
    patterns = []
    for line in lines[lines.index("exclude_docs: |") + 1 :]:
        if not line.startswith("  "):
            break
        patterns.append(line.strip())
    return patterns


def _in_site(page: Path) -> bool:
    relative = page.relative_to(DOCS).as_posix()
    return not any(
        fnmatch.fnmatch(relative if "/" in pattern else page.name, pattern)
        for pattern in excluded_from_site()
    )


#: The pages of the site; a page mkdocs.yml excludes is not one.
PAGES = sorted(page for page in DOCS.rglob("*.md") if _in_site(page))
DOCUMENTS = [README, *PAGES]

#: A hung sample fails the test instead of hanging the suite.
TIMEOUT = 60.0

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(info string, line of the opening fence, body) of each fenced block."""
    blocks: list[tuple[str, int, str]] = []
    opening: re.Match[str] | None = None
    start = 0
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if opening is None:
            opening = _FENCE.match(line)
            start, body = number, []
            continue
        fence = opening["fence"]
        if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            blocks.append((opening["info"], start, "\n".join(body) + "\n"))
            opening = None
        else:
            body.append(line)
    assert opening is None, f"{path}:{start}: code fence is never closed"
    return blocks


def python_blocks() -> list[Block]:
    return [
        Block(path, line, code)
        for path in DOCUMENTS
        for info, line, code in fenced_blocks(path)
        if info == "python"
    ]


BLOCKS = python_blocks()


def test_the_documents_have_samples() -> None:
    """Guards the parser: a page whose samples vanish would pass silently."""
    assert any(block.path == README for block in BLOCKS)
    assert len({block.path for block in BLOCKS}) >= 8


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_python_sample_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "sample.py"
    script.write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    report = f"{block.id}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, report
    # A sample that leaves a failed task unobserved teaches a bad habit.
    assert "exception was never retrieved" not in done.stderr, report


def test_readme_lists_every_public_name() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [
        name
        for name in asyncflow.__all__
        if name != "__version__" and f"`{name}`" not in text
    ]
    assert not missing, f"README.md's API at a glance lacks {missing}"


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    outside_code = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    ]
    in_code = {
        line
        for _, _, body in fenced_blocks(path)
        for line in body.splitlines()
        if line.startswith("#")
    }
    found: set[str] = set()
    for line in outside_code:
        if line in in_code:
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        unique, n = slug, 0
        while unique in found:
            n += 1
            unique = f"{slug}-{n}"
        found.add(unique)
    return found


@pytest.mark.parametrize(
    "document", DOCUMENTS, ids=[str(d.relative_to(REPO)) for d in DOCUMENTS]
)
def test_relative_links_resolve(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    targets = [m["target"] for m in _LINK.finditer(text)]
    broken = [
        target
        for target in targets
        if not re.match(r"[a-z]+:", target) and not _resolves(document, target)
    ]
    assert not broken, f"{document.name} has broken links: {broken}"


def _resolves(document: Path, target: str) -> bool:
    file_part, _, anchor = target.partition("#")
    linked = (document.parent / file_part) if file_part else document
    if not linked.exists():
        return False
    return not anchor or linked.suffix != ".md" or anchor in anchors(linked)


def test_every_page_is_in_the_table_of_contents() -> None:
    """docs/index.md links every page of docs/, and each sub-folder's
    index.md the pages beside it, so every page can be reached by reading."""
    unlisted = []
    for page in PAGES:
        if page == DOCS / "index.md":
            continue
        if page.name == "index.md":
            listing, target = DOCS / "index.md", page.relative_to(DOCS).as_posix()
        else:
            listing, target = page.parent / "index.md", page.name
        if f"({target}" not in listing.read_text(encoding="utf-8"):
            unlisted.append(f"{target} in {listing.relative_to(REPO)}")
    assert not unlisted, f"pages missing from their table of contents: {unlisted}"


def test_every_page_is_in_the_site_navigation() -> None:
    """mkdocs.yml's nav names every page, and only pages that exist."""
    config = MKDOCS.read_text(encoding="utf-8")
    nav = config[config.index("\nnav:") :]
    named = set(re.findall(r"[\w./-]+\.md\b", nav))
    pages = {page.relative_to(DOCS).as_posix() for page in PAGES}
    assert named <= pages, f"mkdocs.yml's nav names missing pages: {named - pages}"
    assert pages <= named, f"mkdocs.yml's nav lacks {sorted(pages - named)}"

"""The documentation lives in the repository and holds together: every relative link in
every Markdown file resolves to a file, every anchor to a heading of that file, and nothing
refers to a file outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def markdown_files() -> list[Path]:
    """The repository's Markdown files (tracked or new, not the venvs')."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted(ROOT / name for name in listed if (ROOT / name).is_file())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (letters,
    digits, spaces, hyphens and underscores kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ...)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#{1,6}) (.+?)\s*#*$", line)
        if m:
            base = slug(m.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """The targets of the inline links and images outside code (fenced or inline)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def test_the_documentation_is_in_the_repository() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    expected = {"docs/reference.md", "docs/operating.md", "docs/design.md"}
    assert expected | {"README.md", "CHANGELOG.md", "CONTRIBUTING.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        assert resolved.is_relative_to(ROOT), f"{target}: outside the repository"
        assert resolved.exists(), f"{path.name}: {target} does not exist"
        if anchor:
            assert resolved.suffix == ".md", f"{target}: an anchor into a non-Markdown file"
            assert anchor in anchors(resolved), f"{path.name}: no heading #{anchor} in {file_part}"


def test_the_anchor_rules_match_github() -> None:
    assert slug("CP token service (`cp-token serve`)") == "cp-token-service-cp-token-serve"
    assert slug("GET /token") == "get-token"
    assert slug("403 access_denied") == "403-access_denied"
    assert slug("Scaling and per-replica state") == "scaling-and-per-replica-state"


def test_nothing_refers_to_a_file_outside_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    this = Path(__file__).resolve()
    outside = re.compile(r"\.\./shared|\bSPEC\.md\b|ARCHITECTURE\.md")
    for name in tracked:
        path = ROOT / name
        if path.resolve() == this or not path.is_file() or path.suffix in (".lock",):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        assert not outside.search(text), f"{name} refers to a file outside the repository"

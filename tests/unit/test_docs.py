"""The README and docs/ link only to what the repository holds (issue 9 item 8)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


def broken_links(page: Path) -> list[str]:
    out = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        missing_heading = anchor and dest.suffix == ".md" and dest.exists() and anchor not in anchors(dest.read_text())
        if not dest.exists() or missing_heading:
            out.append(target)
    return out


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_resolve_in_the_repository(page):
    assert not broken_links(page)


def test_readme_links_to_the_architecture_page_not_to_a_design_file():
    text = (REPO / "README.md").read_text()
    assert "docs/architecture.md" in text
    assert not re.search(r"DESIGN(\.md| section)", text), "DESIGN.md is not in the repository"


def test_a_missing_file_or_heading_is_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# The loop\n## Where to add\n")
    page = tmp_path / "page.md"
    page.write_text("[a](there.md#the-loop) [b](there.md#where-to-add) [c](gone.md) [d](there.md#nope) "
                    "[e](https://example.org/x) [f](#local)\n# Local\n")
    assert broken_links(page) == ["gone.md", "there.md#nope"]

"""The documentation holds together: every relative link in README.md, docs/ and results/ reaches an existing
file (and, with a #fragment, a heading of that file), and the README stays one screen's worth (10 KB), with
everything else behind links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 10 * 1024
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^\s*(```|~~~)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").glob("*.md"))]


def outside_fences(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, in_fence = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            lines.append(line)
    return lines


def links(path: Path) -> list[str]:
    """Link targets outside code (inline code spans are blanked first: a link there is not a link)."""
    return [t for line in outside_fences(path) for t in LINK.findall(re.sub(r"`[^`]*`", "``", line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in outside_fences(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto: — not checked (no network)
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}: {target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{path.name}: {target} (no heading #{fragment})")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    assert broken_links(path) == []


def test_every_docs_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(readme)}
    assert [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked] == []


def test_readme_fits_in_10_kb():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move reference material into docs/"


def test_slug_follows_github():
    assert slug("Token latency: one user against llama.cpp") == "token-latency-one-user-against-llamacpp"
    assert slug("Ray actors against pipeserve's own processes") == "ray-actors-against-pipeserves-own-processes"
    assert slug("Against HF transformers `generate`") == "against-hf-transformers-generate"
    assert slug("Serving, PP=1 vs PP=2") == "serving-pp1-vs-pp2"


def test_the_checker_finds_a_broken_file_and_a_missing_heading(tmp_path: Path):
    (tmp_path / "a.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](a.md#a-heading) [gone](b.md) [no heading](a.md#other) `[code](c.md)`\n"
                    "```\n[fenced](d.md)\n```\n")
    assert broken_links(page) == ["page.md: b.md (no such file)", "page.md: a.md#other (no heading #other)"]

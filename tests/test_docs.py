"""The README as a front door and the documentation site behind it (mkdocs.yml, docs/).

Every relative link in README.md and docs/ must reach a file, every ``#anchor`` into a markdown
file a heading (GitHub's slugs, which mkdocs.yml's toc slugify reproduces), and every page
must be in the site's nav. ``scripts/test.sh`` also builds the site in strict mode; these
checks run without mkdocs.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, every character but word
    characters, hyphens and spaces removed, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]*>", "", text)
    text = unicodedata.normalize("NFC", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a markdown file (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    """The link and image targets of a markdown file that point into the repository (not
    http(s), mailto or another scheme)."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
        for m in [*LINK.finditer(line), *IMAGE.finditer(line)]:
            target = m.group(1)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
                continue
            targets.append(target)
    return targets


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` whose file does not exist, or whose ``#anchor`` is not a
    heading of the markdown file it points into, with the reason."""
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{path.name}: {target}: no heading #{anchor} in {dest.name}")
    return problems


def nav_pages(nav: object) -> list[str]:
    """The page paths listed in an mkdocs nav (nested lists and one-key mappings)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return []


def mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml names a Python callable (the toc slugify) with a python/ tag: read it as data
    Loader.add_multi_constructor(
        "tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


MARKDOWN = [README, *sorted(DOCS.rglob("*.md"))]


def test_readme_is_a_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 210
    assert "bash scripts/main-job.sh" in text
    assert "bash scripts/test.sh" in text
    assert "## Bring your own model" in text.splitlines()


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_every_docs_page_is_in_the_nav() -> None:
    config = mkdocs_config()
    assert config["docs_dir"] == "docs"
    listed = nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(pages) - set(listed)) == []
    assert sorted(set(listed) - set(pages)) == []  # and the nav names no missing page


def test_site_is_strict_and_git_ignored() -> None:
    config = mkdocs_config()
    assert config["strict"] is True
    assert config["validation"]["links"]["anchors"] == "warn"
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "/site/" in ignored or "site/" in ignored


def test_github_slugs() -> None:
    assert github_slug("Bring your own model") == "bring-your-own-model"
    assert github_slug("1. Layout") == "1-layout"
    assert github_slug("MNIST 2C2F, the paper's schedule") == "mnist-2c2f-the-papers-schedule"
    assert github_slug("Mutation testing (opt-in)") == "mutation-testing-opt-in"
    assert github_slug("The `certnet` command") == "the-certnet-command"
    assert github_slug("ℓ∞-dist nets") == "ℓ-dist-nets"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#a-section) [fine too](#page) ![img](other.md) [web](https://example.org)\n"
        "[gone](missing.md) [no anchor](other.md#nope)\n"
        "[code-block comment](other.md#not-a-heading)\n"
        "`[in code](missing-too.md)`\n"
        "```\n[in a fence](missing-three.md)\n```\n")
    assert broken_links(page) == [
        "page.md: missing.md: no such file",
        "page.md: other.md#nope: no heading #nope in other.md",
        "page.md: other.md#not-a-heading: no heading #not-a-heading in other.md",
    ]
    assert nav_pages([{"A": "a.md"}, {"B": [{"C": "b/c.md"}, "d.md"]}]) == ["a.md", "b/c.md",
                                                                              "d.md"]


def test_the_onnx_operator_list_names_every_operator_read() -> None:
    """docs/verify.md's list of ONNX operators is the importer's table (ONNX_OPS), no more,
    no less."""
    from certnet.graph.onnx_import import ONNX_OPS

    text = (ROOT / "docs" / "verify.md").read_text()
    section = text[text.index("ONNX operators ("):text.index("\ntorch: any registered")]
    named = set(re.findall(r"`([A-Z][A-Za-z]+)`", section))
    assert set(ONNX_OPS.names()) <= named, set(ONNX_OPS.names()) - named
    assert named <= set(ONNX_OPS.names()), named - set(ONNX_OPS.names())


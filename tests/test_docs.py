"""The documentation holds together: a short README, links and anchors that lead somewhere, the generated
blocks where the tools rewrite them, and README headline numbers that match the pages they come from."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# Files a long-running tool writes and commits when its first results land; linked before they exist.
PENDING = {ROOT / "docs" / "results" / "fmnist.md": "tools/reproduce_deep_dive.py --dataset fmnist"}
LINK = re.compile(r"!?\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    links = []
    for m in LINK.finditer(prose(page.read_text())):
        target = m.group(1)
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            links.append(target)
    return links


def test_readme_is_an_overview_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move the detail to docs/"
    for section in ("## Quick start", "## Command line", "## The cycle across ranks", "## Results at a glance",
                    "## Documentation"):
        assert section in lines
    quick_start = lines[lines.index("## Quick start"):lines.index("## Command line")]
    assert any(line.startswith("make demo ") for line in quick_start)
    assert any(line.startswith("make test ") for line in quick_start)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_leads_somewhere(page):
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            if dest not in PENDING:
                broken.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_page_in_docs_is_linked_from_the_index():
    index = set(relative_links(ROOT / "docs" / "README.md"))
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "README.md":
            assert page.name in index, f"docs/README.md does not link {page.name}"
    readme = set(relative_links(ROOT / "README.md"))
    assert "docs/README.md" in readme and "docs/results/fmnist.md" in readme


def path_parts(node: ast.expr) -> list[str]:
    """The string parts of `ROOT / "a" / "b"`, in order."""
    if isinstance(node, ast.BinOp):
        return path_parts(node.left) + path_parts(node.right)
    return [node.value] if isinstance(node, ast.Constant) else []


def tool_constants(name: str) -> tuple[Path, tuple[str, ...]]:
    """A tool's DOC (ROOT / "docs" / ...) and BLOCKS, read from its source without importing it (no torch)."""
    tree = ast.parse((ROOT / "tools" / f"{name}.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in (
                "DOC", "BLOCKS"):
            if node.targets[0].id == "BLOCKS":
                found["BLOCKS"] = ast.literal_eval(node.value)
            else:
                found["DOC"] = ROOT.joinpath(*path_parts(node.value))
    return found["DOC"], found["BLOCKS"]


@pytest.mark.parametrize("tool, tag, doc", [("digits_figures", "digits_figures", "docs/evaluation.md"),
                                            ("reproduce_deep_dive", "deep_dive", "docs/deep_dive.md")])
def test_generated_blocks_are_where_their_tool_writes_them(tool, tag, doc):
    target, names = tool_constants(tool)
    assert target == ROOT / doc
    text = target.read_text()
    for name in names:
        body = re.search(rf"<!-- {tag}:{name} -->\n(.*?)<!-- /{tag}:{name} -->", text, re.S)
        assert body and body.group(1).strip(), f"no filled <!-- {tag}:{name} --> block in {doc}"
    for page in PAGES:  # one copy only: a second one would go stale when the tool rewrites the first
        if page != target:
            assert f"<!-- {tag}:" not in page.read_text(), f"{page.relative_to(ROOT)} holds {tag} blocks"


def test_doc_option_defaults_to_the_docs_page_and_keeps_readme_as_an_alias():
    spec = importlib.util.spec_from_file_location("digits_figures", ROOT / "tools" / "digits_figures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    parser = argparse.ArgumentParser()
    tool.add_doc_option(parser, tool.DOC)
    assert parser.parse_args([]).doc is None  # print the blocks, rewrite nothing
    assert parser.parse_args(["--doc"]).doc == str(ROOT / "docs" / "evaluation.md")
    assert parser.parse_args(["--doc", "x.md"]).doc == "x.md"
    assert parser.parse_args(["--readme", "README.md"]).doc == "README.md"


def test_headline_numbers_match_the_pages_they_link():
    """Every number of a 'Results at a glance' row appears on the docs page the row links (so a tool that
    re-measures the page, without the README following, fails here instead of leaving a stale README)."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Results at a glance", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| what")]
    assert len(rows) >= 5
    for row in rows:
        what, result, details = [c.strip() for c in row.strip("|").split(" | ")]
        (link,) = re.findall(r"\]\(([^)#]+)", details)
        page = (ROOT / link).read_text()
        for number in re.findall(r"\d[\d,]*(?:\.\d+)?", result):
            assert re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", page), \
                f"README headline '{what}': {number} is not in {link}"


def table_cells(row: str) -> int:
    """Cells of a markdown table row (pipes inside code spans or escaped do not split)."""
    return re.sub(r"`[^`]*`", "x", row).replace("\\|", "x").strip().strip("|").count("|") + 1


@pytest.mark.parametrize("page", [*PAGES, *sorted((ROOT / "docs" / "results").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_has_its_header_s_columns(page):
    """A row pasted into the wrong table (or cut short) renders as garbage on GitHub."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    for table in re.findall(r"(?:^\|.*\n?){2,}", text, flags=re.M):
        rows = table.splitlines()
        header = table_cells(rows[0])
        assert [r for r in rows if table_cells(r) != header] == [], f"{page.name}: rows of another width"
        assert not re.search(rf"^[^|\n]+\|.*\|\s*$", text[text.index(table) + len(table):].split("\n\n")[0],
                             flags=re.M), f"{page.name}: a table row glued to text after a table"

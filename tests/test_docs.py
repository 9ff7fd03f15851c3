"""The project's Markdown: every relative link reaches a file of the tree, and every #anchor a heading
of that file (as GitHub renders it), so a renamed section or a moved file cannot leave the README
pointing nowhere."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every .md under the root
        return sorted(p for p in ROOT.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts)
    return [ROOT / p for p in out]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, inline markup and punctuation dropped, spaces as
    hyphens (letters, digits, '-' and '_' kept; 'x × y' gives 'x--y')."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file's headings, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of each inline link outside code fences and code spans."""
    found, fenced = [], False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            found += [(i, m.group(1)) for m in LINK.finditer(re.sub(r"`[^`]*`", "", line))]
    return found


def broken(path: Path) -> list[str]:
    bad = []
    for line, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, s3: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{path.relative_to(ROOT)}:{line}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {target} (no such heading)")
    return bad


def test_slug_follows_github():
    assert slug("Through `jepa-ray tune` itself: mask ratio × learning rate (current)") == (
        "through-jepa-ray-tune-itself-mask-ratio--learning-rate-current"
    )
    assert slug("What the console shows, `--verbose`, and where the logs go") == (
        "what-the-console-shows---verbose-and-where-the-logs-go"
    )
    assert slug("Real EHR (GBSG2, WHAS500)") == "real-ehr-gbsg2-whas500"


def test_checker_finds_a_broken_link(tmp_path, monkeypatch):
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n\n## Part one\n\n## Part one\n", encoding="utf-8")
    doc.write_text(
        "# A\n[ok](b.md#part-one) [second](b.md#part-one-1) [self](#a) [web](https://x.org/y)\n"
        "[gone](c.md) [bad anchor](b.md#part-two)\n```\n[in a fence](nowhere.md)\n```\n"
        "`[in a span](nowhere.md)`\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert broken(doc) == [
        "a.md:3: c.md (no such file)",
        "a.md:3: b.md#part-two (no such heading)",
    ]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    assert broken(path) == []

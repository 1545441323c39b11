"""The README and docs/*.md: links resolve, anchors match headings, named scripts/configs exist, README stays short.

Plain text checks (no torch, no package import), one test per file and check, so a failure names the file and the
bad link or path:
1. every relative link target, `[text](path)` and `![alt](path)`, exists relative to the file that links it
   (http(s)/mailto links and pure `#anchor` links are not files; a `#fragment` is stripped first);
2. every `#anchor` into a markdown file (the same file or another) matches one of its headings under GitHub's
   slug rule (lowercase, punctuation other than `-` and `_` dropped, spaces to `-`, repeats numbered `-1`, `-2`);
3. every `scripts/...` or `configs/...` path named anywhere in the text, code blocks included, exists (`{a,b}`
   names both, a `*` glob must match something);
4. README.md has at most 250 lines;
5. every docs/*.md page is linked from README.md.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

FILES = [README] + sorted(DOCS.glob("*.md"))
IDS = [str(f.relative_to(ROOT)) for f in FILES]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# a scripts/ or configs/ path: not part of a longer path or word; `{a,b}` alternatives and `*` globs allowed
REPO_PATH = re.compile(r"(?<![\w/.-])(?:scripts|configs)/(?:[\w./*-]|\{[\w.,-]*\})+")
EXTERNAL = ("http://", "https://", "mailto:")


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, with inline code removed; all lines)."""
    prose, in_fence = [], False
    lines = text.splitlines()
    for line in lines:
        if FENCE.match(line):
            in_fence = not in_fence
            prose.append("")
            continue
        prose.append("" if in_fence else INLINE_CODE.sub("", line))
    return prose, lines


def slug_base(heading: str) -> str:
    """GitHub's anchor for a heading's text (before numbering repeats)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """All heading anchors of a markdown file (fenced code is not a heading)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else HEADING.match(line)
        if m:
            base = slug_base(m.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    return [(i, m.group(1)) for i, line in enumerate(prose, 1) for m in LINK.finditer(line)]


def expand_braces(path: str) -> list[str]:
    """`configs/squad/{a,b}.yaml` -> both paths."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_relative_links_exist(path: Path) -> None:
    bad = []
    for line, target in links(path):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            bad.append(f"line {line}: {target}")
    assert not bad, f"{path.relative_to(ROOT)}: links to missing files:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_anchors_match_headings(path: Path) -> None:
    bad = []
    for line, target in links(path):
        if target.startswith(EXTERNAL) or "#" not in target:
            continue
        file_part, anchor = target.split("#", 1)
        dest = (path.parent / file_part) if file_part else path
        if dest.suffix != ".md" or not dest.is_file():
            continue  # a missing file is reported by test_relative_links_exist
        if anchor not in anchors(dest):
            bad.append(f"line {line}: {target} (no such heading in {dest.relative_to(ROOT)})")
    assert not bad, f"{path.relative_to(ROOT)}: anchors without a heading:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_named_scripts_and_configs_exist(path: Path) -> None:
    bad = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for m in REPO_PATH.finditer(line):
            named = m.group(0).rstrip(".-")
            for candidate in expand_braces(named):
                exists = any(ROOT.glob(candidate)) if "*" in candidate else (ROOT / candidate).exists()
                if not exists:
                    bad.append(f"line {line_no}: {candidate}")
    assert not bad, f"{path.relative_to(ROOT)}: names paths that do not exist:\n" + "\n".join(bad)


def test_readme_is_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail into docs/"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_docs_page_is_linked_from_readme(page: Path) -> None:
    linked = {(README.parent / t.split("#", 1)[0]).resolve() for _, t in links(README)
              if not t.startswith(EXTERNAL) and not t.startswith("#")}
    assert page.resolve() in linked, f"{page.relative_to(ROOT)} is not linked from README.md"


def test_the_rules_themselves() -> None:
    """The slug rule and the path pattern on known cases (GitHub's own anchors for these headings)."""
    assert slug_base("Comparing with the paper: `python -m reproduce.report`") == \
        "comparing-with-the-paper-python--m-reproducereport"
    assert slug_base("Question answering: SQuAD v1.1 (`run_squad.py`)") == "question-answering-squad-v11-run_squadpy"
    assert slug_base("LPAF: `--method lpaf` (Low-Rank Prune-And-Factorize)") == \
        "lpaf---method-lpaf-low-rank-prune-and-factorize"
    assert expand_braces("configs/squad/{a,b}.yaml") == ["configs/squad/a.yaml", "configs/squad/b.yaml"]
    assert [m.group(0) for m in REPO_PATH.finditer("`scripts/benchmark_*.py`")] == ["scripts/benchmark_*.py"]
    found = [m.group(0) for m in REPO_PATH.finditer("run scripts/quickstart.sh. See yxli2123/scripts/x, "
                                                    "configs/summarization/bart-large-{xsum,cnn}.yaml")]
    assert found == ["scripts/quickstart.sh.", "configs/summarization/bart-large-{xsum,cnn}.yaml"]

"""README.md is a short front door whose links resolve and whose results block is the generated one.

These tests check structure only (size, links, the generated block, the two commands); they never pin
README prose."""

import re
from pathlib import Path

import pytest

from hdlib.tools.readme import README_END, README_START, results_block

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
MAX_README_BYTES = 8192

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
HTML_SRC = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    return [README] + sorted((REPO_ROOT / "docs").glob("*.md"))


def relative_targets(text: str) -> list[str]:
    """Every relative link or image target outside code, without its #anchor or ?query."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    out = []
    for target in LINK.findall(text) + HTML_SRC.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")):
            continue  # http:, https:, mailto:, ... or an anchor in the same file
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path:
            out.append(path)
    return out


def test_relative_targets_parser():
    text = ("[a](docs/x.md#sec) ![b](img/y.png \"title\") [c](https://e.org) [d](#top) <img src=\"z.png\">\n"
            "`[e](in/span.md)`\n```\n[f](in/fence.md)\n```\n")
    assert relative_targets(text) == ["docs/x.md", "img/y.png", "z.png"]


def test_readme_is_at_most_8_kib():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move material to docs/ (limit {MAX_README_BYTES})"


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_point_to_existing_files(md):
    missing = [t for t in relative_targets(md.read_text()) if not (md.parent / t).exists()]
    assert not missing, f"{md.relative_to(REPO_ROOT)} links to missing paths: {missing}"


def test_readme_results_block_is_the_generated_one():
    study = REPO_ROOT / "results" / "default"
    if not (study / "README_block.md").exists():
        pytest.skip("results/default/README_block.md has not been produced (run the default study's stage 07)")
    text = README.read_text()
    assert text.count(README_START) == 1 and text.count(README_END) == 1, "README needs exactly one results block"
    block = text[text.index(README_START):text.index(README_END) + len(README_END)]
    assert block == results_block(study), "README results are stale: run `python -m hdlib readme params/default.yaml`"


def test_readme_has_results_markers():
    text = README.read_text()
    assert README_START in text and README_END in text
    assert text.index(README_START) < text.index(README_END)


def test_readme_names_the_two_commands():
    text = README.read_text()
    for command in ("make study", "make test"):
        assert command in text, f"README.md does not mention `{command}`"

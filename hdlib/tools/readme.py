"""`python -m hdlib readme`: splice the default study's results block (written by stage 07
into results/<study>/README_block.md) into README.md between its markers."""

from __future__ import annotations

from pathlib import Path

from ..errors import HDLibError
from ..io import atomic_write_text
from ..paths import REPO_ROOT, StudyPaths

README_START = "<!-- results:default start (written by `python -m hdlib readme`; do not edit) -->"
README_END = "<!-- results:default end -->"


def readme_path() -> Path:
    return REPO_ROOT / "README.md"


def results_block(study_dir: str | Path) -> str:
    """The marked block as it belongs in the README: stage 07's rendering between the markers."""
    path = StudyPaths(study_dir).readme_block
    if not path.exists():
        raise HDLibError(f"{path}: missing; run the study's stage 07 (python -m hdlib run ...)")
    return README_START + "\n\n" + path.read_text() + "\n" + README_END


def sync_readme(study_dir: str | Path, readme: Path) -> bool:
    """Replace the README's marked results block; True if it changed."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise HDLibError(f"{readme}: results markers not found")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    new = head + results_block(study_dir) + tail
    if new != text:
        atomic_write_text(readme, new)
    return new != text

"""Builds the stage notebooks notebooks/NN_*.ipynb from their sources notebooks/src/NN_*.py
(jupytext percent format: `# %%` code cells, `# %% [markdown]` text cells, the papermill
parameters cell `# %% tags=["parameters"]`). Run after editing a source:

    python -m hdlib.tools.notebook_build            # or: make notebooks
    python -m hdlib.tools.notebook_build --check    # exit 1 when a committed notebook is out of date

The .ipynb files are what papermill executes and what users open in JupyterLab; an edit made
there must be ported to the source, or the next build overwrites it (tests/test_notebook_sources.py
fails while a committed notebook differs from its build).

Output is deterministic: no outputs or execution counts, fixed notebook metadata, and cell ids
`NN_name-00`, `NN_name-01`, ... from the notebook name and a cell counter, so rebuilding unchanged
sources gives byte-identical files (the runner fingerprints a stage by its notebook's bytes: a
rebuild that changed nothing re-runs nothing). A cell whose header gives an id, `# %% id="08a"`,
gets `NN_name-08a` and does not advance the counter: a cell inserted that way leaves the ids of
the cells after it unchanged.

Conventions for the sources: notebook NN calls `hdlib.stages.<stage>` (and earlier stages),
`hdlib.paths`, `hdlib.train`, `hdlib.evaluation.stats` and `hdlib.plots`; it holds no plotting code and no
computation longer than a few lines. Every figure and table comes after a short text saying what it
shows, how to read it and what a good result looks like. The setup cell (the one after the
parameters cell) ends with the same lines in every notebook: load the config and say where results
go (a relative path only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]  # as hdlib.paths.REPO_ROOT, without its imports
SRC_DIR = REPO_ROOT / "notebooks" / "src"
OUT_DIR = REPO_ROOT / "notebooks"
# Fixed notebook metadata: the sources' jupytext header is not copied (it may carry a version).
METADATA = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}}


def sources(src_dir: Path = SRC_DIR) -> list[Path]:
    """The notebook sources NN_*.py, in name order."""
    return sorted(Path(src_dir).glob("[0-9][0-9]_*.py"))


def notebook(src: Path) -> nbformat.NotebookNode:
    """The notebook built from one percent-format source."""
    text_nb = jupytext.read(src, fmt="py:percent")
    nb = nbformat.v4.new_notebook(metadata={k: dict(v) for k, v in METADATA.items()})
    n = 0
    for cell in text_nb.cells:
        metadata = dict(cell.metadata)
        if "id" in metadata:  # `# %% id="08a"`: a cell inserted without renumbering the ones after it
            cell_id = f"{src.stem}-{metadata.pop('id')}"
        else:
            cell_id, n = f"{src.stem}-{n:02d}", n + 1
        if cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(cell.source, metadata=metadata)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(cell.source, metadata=metadata)
        else:
            new = nbformat.v4.new_raw_cell(cell.source, metadata=metadata)
        new["id"] = cell_id
        nb.cells.append(new)
    ids = [c["id"] for c in nb.cells]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{src}: duplicate cell ids {sorted({i for i in ids if ids.count(i) > 1})}")
    nbformat.validate(nb)
    return nb


def render(src: Path) -> str:
    """The .ipynb text built from one source (what `build` writes)."""
    text = nbformat.writes(notebook(src))
    return text if text.endswith("\n") else text + "\n"


def build(src_dir: Path = SRC_DIR, out_dir: Path = OUT_DIR) -> list[Path]:
    """Writes out_dir/NN_name.ipynb for every src_dir/NN_name.py; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources(src_dir):
        path = out_dir / f"{src.stem}.ipynb"
        path.write_text(render(src), encoding="utf-8")
        written.append(path)
    return written


def stale(src_dir: Path = SRC_DIR, out_dir: Path = OUT_DIR) -> list[str]:
    """Notebooks in out_dir that differ from their build, lack a source, or are missing."""
    out_dir = Path(out_dir)
    srcs = sources(src_dir)
    problems = [f"{src.stem}.ipynb" for src in srcs if not (out_dir / f"{src.stem}.ipynb").is_file()
                or (out_dir / f"{src.stem}.ipynb").read_text(encoding="utf-8") != render(src)]
    names = {src.stem for src in srcs}
    problems += [f"{p.name} (no source)" for p in sorted(out_dir.glob("[0-9][0-9]_*.ipynb")) if p.stem not in names]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hdlib.tools.notebook_build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=SRC_DIR, help="folder of NN_*.py sources")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="folder the NN_*.ipynb notebooks go to")
    ap.add_argument("--check", action="store_true", help="only check that the notebooks are up to date")
    args = ap.parse_args(argv)
    if not sources(args.src):
        print(f"{args.src}: no notebook sources (NN_*.py)", file=sys.stderr)
        return 1
    if args.check:
        problems = stale(args.src, args.out)
        for p in problems:
            print("out of date:", p, file=sys.stderr)
        return 1 if problems else 0
    for path in build(args.src, args.out):
        print("wrote", path.relative_to(REPO_ROOT) if path.resolve().is_relative_to(REPO_ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

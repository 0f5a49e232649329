"""The stage notebooks notebooks/NN_*.ipynb are built from notebooks/src/NN_*.py (jupytext percent
format) by hdlib.tools.notebook_build: the sources are valid Python with one papermill parameters cell,
the committed notebooks are exactly what the sources build to, and no notebook carries a machine
path."""

import ast
import py_compile
import re
from pathlib import Path

import jupytext
import pytest

from hdlib.tools import notebook_build

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "notebooks" / "src"
NOTEBOOKS = ROOT / "notebooks"
SOURCES = notebook_build.sources(SRC)
ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|tmp|root|Users)/")


def test_every_stage_notebook_has_a_source():
    assert SOURCES, f"no notebook sources in {SRC}"
    committed = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert [p.stem for p in SOURCES] == committed
    assert not (NOTEBOOKS / "build_notebooks.py").exists(), "the notebooks are built from notebooks/src/"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_source_compiles_and_has_one_parameters_cell(src, tmp_path):
    py_compile.compile(str(src), cfile=str(tmp_path / "src.pyc"), doraise=True)
    nb = jupytext.read(src, fmt="py:percent")
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        ast.parse(cell.source, filename=f"{src.name} code cell {i}")
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{src.name}: {len(params)} parameters cells"
    assert nb.cells[1] is params[0], f"{src.name}: the parameters cell is the second cell, after the title"
    assert {c.cell_type for c in nb.cells} <= {"code", "markdown"}


def test_building_the_sources_gives_the_committed_notebooks(tmp_path):
    written = notebook_build.build(SRC, tmp_path)
    assert [p.name for p in written] == [f"{p.stem}.ipynb" for p in SOURCES]
    for path in written:
        committed = NOTEBOOKS / path.name
        assert committed.read_bytes() == path.read_bytes(), \
            f"notebooks/{path.name} differs from its source: run `make notebooks` (python -m hdlib.tools.notebook_build)"
    assert notebook_build.stale(SRC, NOTEBOOKS) == []


def test_build_is_deterministic(tmp_path):
    first = {p.name: p.read_bytes() for p in notebook_build.build(SRC, tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in notebook_build.build(SRC, tmp_path / "b")}
    assert first == second


EXECUTED = sorted((ROOT / "results").glob("*/[0-9][0-9]_*.ipynb"))  # the committed studies' executed notebooks


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) + SOURCES + EXECUTED,
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_absolute_paths(path):
    hits = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if ABSOLUTE_PATH.search(line)]
    assert not hits, f"{path.name} contains absolute paths: {hits[:3]}"


def test_explicit_cell_ids_keep_later_ids(tmp_path):
    src = tmp_path / "00_demo.py"
    src.write_text('# %% [markdown]\n# # Demo\n\n# %% tags=["parameters"]\nx = 1\n\n'
                   '# %% id="01a"\ny = 2\n\n# %%\nz = x + y\n')
    nb = notebook_build.notebook(src)
    assert [c["id"] for c in nb.cells] == ["00_demo-00", "00_demo-01", "00_demo-01a", "00_demo-02"]
    assert all("id" not in c.metadata for c in nb.cells)
    assert nb.cells[1].metadata == {"tags": ["parameters"]}
    assert all(c.get("execution_count") is None and c.get("outputs", []) == [] for c in nb.cells)
    assert dict(nb.metadata) == notebook_build.METADATA


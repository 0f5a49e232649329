"""hdlib.grid: resumable, optionally parallel experiment grid."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so workers can import _grid_cells too

from hdlib.errors import HDLibError  # noqa: E402
from hdlib.parallel.grid import GridCellError, cell_id, remove_other_results, run_grid  # noqa: E402

FN = "_grid_cells:toy_cell"


def make_cells(marker=None, n=4):
    cells = [{"a": a, "b": b} for a in range(n // 2) for b in (10, 20)]
    if marker:
        for c in cells:
            c["marker"] = str(marker)
    return cells


def calls(marker):
    return len(Path(marker).read_text().splitlines()) if Path(marker).exists() else 0


def test_cell_id_stable_and_safe():
    assert cell_id({"seed": 0, "fraction": 0.01, "set": "real"}) == "fraction=0.01_seed=0_set=real"
    assert cell_id({"set": "real", "fraction": 0.01, "seed": 0}) == cell_id({"seed": 0, "fraction": 0.01, "set": "real"})
    assert cell_id({"seed": 0, "fraction": 0.01}, keys=["seed"]) == "seed=0"
    path_id = cell_id({"dir": "/a/b c", "seed": 1})
    assert "/" not in path_id and " " not in path_id
    assert path_id != cell_id({"dir": "/a/b-c", "seed": 1})  # replaced characters do not collide
    assert cell_id({"id": "mine", "x": 1}) == "mine"
    assert len(cell_id({"x": "y" * 500})) <= 150
    with pytest.raises(HDLibError, match="no key 'seed'"):
        cell_id({"a": 1}, keys=["seed"])


def test_run_grid_results_and_json(tmp_path):
    df = run_grid(make_cells(), FN, tmp_path / "grid", progress=False)
    assert list(df["sum"]) == [10, 20, 11, 21]
    assert list(df["nested.product"]) == [0, 0, 10, 20]
    assert list(df["id"]) == ["a=0_b=10", "a=0_b=20", "a=1_b=10", "a=1_b=20"]
    rec = json.loads((tmp_path / "grid" / "a=1_b=20.json").read_text())
    assert rec["cell"] == {"a": 1, "b": 20}
    assert rec["result"]["nested"]["pair"] == [1, 1]
    assert df["elapsed_s"].iloc[3] == rec["elapsed_s"]
    # elapsed_s times the cell function itself: a cell that sleeps 0.2 s takes at least that
    slow = run_grid([{"a": 0, "b": 0, "sleep": 0.2}], FN, tmp_path / "slow", progress=False)
    assert 0.2 <= slow["elapsed_s"].iloc[0] < 0.2 + 10
    assert not [p for p in (tmp_path / "grid").iterdir() if p.suffix != ".json"]  # no temp files


def test_resume_skips_done_cells(tmp_path):
    marker = tmp_path / "calls.txt"
    cells = make_cells(marker)
    run_grid(cells[:2], FN, tmp_path / "grid", progress=False)  # a half-finished grid
    assert calls(marker) == 2
    df = run_grid(cells, FN, tmp_path / "grid", progress=False)
    assert calls(marker) == 4  # only the two missing cells ran
    assert len(df) == 4
    run_grid(cells, FN, tmp_path / "grid", progress=False)
    assert calls(marker) == 4


def test_stale_result_is_recomputed_never_reused(tmp_path):
    first = run_grid([{"id": "c1", "a": 1, "b": 2}], FN, tmp_path, progress=False)
    again = run_grid([{"id": "c1", "a": 1, "b": 2}], FN, tmp_path, progress=False)
    assert again.attrs["computed"] == [] and again.attrs["stale_recomputed"] == []
    changed = run_grid([{"id": "c1", "a": 1, "b": 3}], FN, tmp_path, progress=False)
    assert changed.attrs["stale_recomputed"] == ["c1"] and changed.attrs["computed"] == ["c1"]
    assert changed.loc[0, "b"] == 3 and changed.loc[0, "sum"] != first.loc[0, "sum"]
    # ids from a subset of keys: a changed content key (outside the id) re-runs exactly that cell
    cells = [{"a": 1, "b": 2, "inputs": "x"}, {"a": 2, "b": 2, "inputs": "y"}]
    run_grid(cells, FN, tmp_path / "k", id_keys=["a"], progress=False)
    cells[1]["inputs"] = "y2"
    out = run_grid(cells, FN, tmp_path / "k", id_keys=["a"], progress=False)
    assert out.attrs["stale_recomputed"] == ["a=2"]


def test_duplicate_ids_and_bad_cell_fn(tmp_path):
    with pytest.raises(HDLibError, match="share the id"):
        run_grid([{"id": "x", "a": 1, "b": 1}, {"id": "x", "a": 2, "b": 1}], FN, tmp_path, progress=False)
    with pytest.raises(HDLibError, match="cannot import"):
        run_grid(make_cells(), "_grid_cells:nope", tmp_path, progress=False)
    with pytest.raises(HDLibError, match="package.module:function"):
        run_grid(make_cells(), "no_colon", tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # nothing ran


def test_failing_cell_reported_after_others_finish(tmp_path):
    marker = tmp_path / "calls.txt"
    cells = make_cells(marker)
    cells[1]["fail"] = True
    with pytest.raises(GridCellError, match=r"1 of 4 grid cells failed: a=0_b=20_fail=true.*RuntimeError: boom a=0"):
        run_grid(cells, FN, tmp_path / "grid", progress=False)
    assert calls(marker) == 4  # the other cells still ran
    assert len(list((tmp_path / "grid").glob("*.json"))) == 3
    cells[1]["fail"] = False  # fixed: a new id, only that cell runs on resume
    df = run_grid(cells, FN, tmp_path / "grid", progress=False)
    assert calls(marker) == 5 and len(df) == 4


def test_parallel_workers_match_serial(tmp_path):
    marker = tmp_path / "calls.txt"
    cells = make_cells(marker, n=6)
    cells[4]["fail"] = True
    with pytest.raises(GridCellError, match="a=2_b=10_fail=true"):
        run_grid(cells, FN, tmp_path / "par", workers=2, threads_per_worker=1, progress=False)
    pids = {line.split(",")[2] for line in marker.read_text().splitlines()}
    assert calls(marker) == 6
    assert str(os.getpid()) not in pids  # cells ran in worker processes
    del cells[4]["fail"]
    par = run_grid(cells, FN, tmp_path / "par", workers=2, threads_per_worker=1, progress=False)
    ser = run_grid(cells, FN, tmp_path / "ser", workers=1, progress=False)
    cols = [c for c in ser.columns if c != "elapsed_s"]
    assert par[cols].equals(ser[cols])
    threads = run_grid([{"k": i} for i in range(2)], "_grid_cells:threads_cell", tmp_path / "thr", workers=2,
                       threads_per_worker=1, progress=False)
    assert list(threads["threads"]) == [1, 1]


def test_remove_other_results_keeps_only_the_listed_cells(tmp_path):
    for cid in ("a", "b", "c"):
        (tmp_path / f"{cid}.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not a result")
    assert remove_other_results(tmp_path, {"a", "c", "d"}) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "c.json", "notes.txt"]


def test_only_the_whole_downstream_grid_removes_other_runs_cells(monkeypatch, tmp_path):
    """Stage 03 runs part of the grid (real-only cells): that must never delete stage 05's cells."""
    import pandas as pd

    import hdlib.study.grid_cells as gc

    cells = {"real": [{"fraction": 0.05, "training_set": "real", "ratio": 0.0, "seed": 0}],
             None: [{"fraction": 0.05, "training_set": t, "ratio": r, "seed": 0}
                    for t, r in (("real", 0.0), ("histodiffusion", 1.0))]}
    monkeypatch.setattr(gc, "downstream_cells", lambda cfg, primary, sets: cells["real" if sets else None])
    monkeypatch.setattr(gc, "run_grid", lambda *a, **k: pd.DataFrame())
    monkeypatch.setattr(gc, "StudyPaths", lambda cfg: type("P", (), {"grid": tmp_path})())
    cfg = type("C", (), {"study": type("S", (), {"workers": 1, "progress": False, "device": "cpu"})(),
                           "results_dir": tmp_path})()
    ids = [gc.cell_id(c, gc.ID_KEYS) for c in cells[None]] + ["fraction=0.1_ratio=0.0_seed=7_training_set=real"]
    for cid in ids:
        (tmp_path / f"{cid}.json").write_text("{}")
    gc.run_downstream_grid(cfg, primary=0.05, training_sets=["real"])
    assert len(list(tmp_path.glob("*.json"))) == 3
    out = gc.run_downstream_grid(cfg, primary=0.05)
    assert out.attrs["removed_other_runs"] == [ids[2]]
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == sorted(ids[:2])


def test_torch_threads_sets_the_count_for_the_block_and_restores_it_after_an_error():
    import torch

    from hdlib.parallel.threads import torch_threads

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
        raise RuntimeError("the block failed")
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0: leave it
        assert torch.get_num_threads() == before

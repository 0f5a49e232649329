"""Experiment grid runner: run a function over a list of cells (dicts of settings),
one JSON result per cell, resumable, optionally in parallel processes.

Each cell's result goes to `<out_dir>/<id>.json` = {"id", "cell", "result",
"elapsed_s"}, written atomically; a re-run skips cells whose JSON exists. A JSON
whose stored cell differs from the current one is stale and never reused: it is
recomputed (listed in the returned frame's
`attrs["stale_recomputed"]`). Put a content key of the cell's inputs in the cell
(outside `id_keys`) so that a changed input re-runs exactly the cells that use it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from tqdm import tqdm

from ..errors import HDLibError
from ..io import atomic_write_json, read_json
from .progress import ENV as PROGRESS_ENV
from .progress import Progress

__all__ = ["GridCellError", "StaleResultError", "cell_id", "load_cell_fn", "run_grid"]

_MAX_ID_LEN = 150


class GridCellError(HDLibError):
    """One or more grid cells raised; the message names each cell id and its error."""


class StaleResultError(HDLibError):
    """A cell's result file exists but was made for different cell settings."""


def _json_default(obj):
    return obj.item() if hasattr(obj, "item") else str(obj)  # numpy scalars -> numbers


def _normalized(cell: dict) -> dict:
    """The cell as it reads back from JSON (tuples -> lists, numpy -> numbers), for comparisons."""
    return json.loads(json.dumps(cell, sort_keys=True, default=_json_default))


def cell_id(cell: dict, keys: Sequence[str] | None = None) -> str:
    """Stable, file-name-safe id from the sorted key=value pairs of `cell` (only `keys`
    if given), e.g. 'fraction=0.01_seed=0_training_set=real'. An explicit cell["id"]
    wins. Ids whose text had to be changed (unsafe characters, too long) end with a
    short hash of the full text."""
    if "id" in cell:
        text = str(cell["id"])
    else:
        use = sorted(cell) if keys is None else sorted(keys)
        missing = [k for k in use if k not in cell]
        if missing:
            raise HDLibError(f"cell_id: cell has no key {missing[0]!r}: {cell}")
        text = "_".join(f"{k}={json.dumps(cell[k], sort_keys=True, default=_json_default).strip(chr(34))}" for k in use)
    safe = re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-.") or "cell"
    # Characters replaced or text cut: add a hash of the full text so ids stay distinct.
    if len(safe) > _MAX_ID_LEN or safe != text:
        import hashlib

        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        safe = f"{safe[: _MAX_ID_LEN - 11]}-{digest}"
    return safe


def remove_other_results(out_dir: str | Path, keep_ids) -> list[str]:
    """Delete the result JSONs in `out_dir` whose id is not in `keep_ids`: cells of an
    earlier run's grid (other seeds or label counts) that the current grid no longer holds,
    so that a results folder reports only its own run. Returns the removed ids, sorted."""
    keep = set(keep_ids)
    removed = sorted(p.stem for p in Path(out_dir).glob("*.json") if p.stem not in keep)
    for cid in removed:
        (Path(out_dir) / f"{cid}.json").unlink()
    return removed


def load_cell_fn(spec: str) -> Callable[[dict], dict]:
    """Import 'package.module:function'."""
    module_name, sep, fn_name = spec.partition(":")
    if not sep or not module_name or not fn_name:
        raise HDLibError(f"cell_fn {spec!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise HDLibError(f"cell_fn {spec!r}: cannot import ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise HDLibError(f"cell_fn {spec!r}: not callable")
    return fn


def _pin_worker_device(device_queue) -> None:
    """Worker initializer: take one device id from the queue and make it this process's only visible
    GPU (before CUDA starts in it), so `cuda` in the worker is its own GPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(device_queue.get())


def worker_count(workers: int, devices: Sequence[str] | None) -> int:
    """Never more workers than devices when devices are given (GPUs): two on one GPU only contend."""
    return min(workers, len(devices)) if devices else workers


def worker_threads(workers: int) -> int | None:
    """torch threads of each of `workers` grid workers (None: one worker, the process's own count).
    Share the cores: oversubscribed OpenMP threads make every worker many times slower."""
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None


def _run_one(cell_fn: str, cell: dict, cid: str, out_dir: str, threads: int | None,
             context: dict | None = None) -> tuple[str, str | None]:
    """Run one cell and write its JSON. Returns (id, None) or (id, one-line error).
    Top-level so that spawned worker processes can import it."""
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    channel = os.environ.pop(PROGRESS_ENV, None)  # a cell's own training is not the grid's progress
    try:
        fn = load_cell_fn(cell_fn)
        start = time.perf_counter()
        result = fn({**cell, **(context or {})})
        elapsed = time.perf_counter() - start
        if not isinstance(result, dict):
            raise HDLibError(f"cell_fn returned {type(result).__name__}, expected a dict")
        atomic_write_json(Path(out_dir) / f"{cid}.json",
                          {"id": cid, "cell": _normalized(cell), "result": result, "elapsed_s": elapsed})
        return cid, None
    except Exception as exc:  # noqa: BLE001 - reported by the parent with the cell id
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        loc = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return cid, f"{type(exc).__name__}: {msg}{loc}"
    finally:
        torch.set_num_threads(previous_threads)
        if channel is not None:
            os.environ[PROGRESS_ENV] = channel


def _flatten(d: dict, prefix: str = "") -> dict:
    """{'test': {'accuracy': 0.9}} -> {'test.accuracy': 0.9}; lists stay as values."""
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def run_grid(cells: list[dict], cell_fn: str, out_dir: str | Path, *, workers: int = 1,
             threads_per_worker: int | None = None, id_keys: Sequence[str] | None = None,
             progress: bool = True, context: dict | None = None,
             devices: Sequence[str] | None = None) -> pd.DataFrame:
    """Run `cell_fn` ('package.module:function', taking a cell dict and returning a
    JSON-able dict) on every cell not already done in `out_dir`.

    Cells run in this process (workers=1) or in `workers` spawned processes, each with
    `torch.set_num_threads(threads_per_worker)` if given. Ids come from `cell_id(cell,
    id_keys)`. A failing cell does not stop the others; after all have run a
    GridCellError names every failed id and its error. Returns one row per cell, in the
    order given: the cell's fields, `id`, `elapsed_s` and the result flattened with
    dotted keys (e.g. 'test.accuracy'). `context` is passed to every cell with its fields
    (e.g. where the study lives) but is not part of the cell: it neither names nor stales it.
    `devices`: GPU ids; each worker process sees one of them only (CUDA_VISIBLE_DEVICES, one per
    worker, round-robin), and there are never more workers than devices."""
    if workers < 1:
        raise HDLibError(f"run_grid: workers must be >= 1, got {workers}")
    workers = worker_count(workers, devices)
    if threads_per_worker is None:
        threads_per_worker = worker_threads(workers)
    out_dir = Path(out_dir)
    ids = [cell_id(c, id_keys) for c in cells]
    unique = _unique_cells(ids, cells)
    load_cell_fn(cell_fn)  # fail on a bad spec before any work
    todo, rerun = _cells_to_run(unique, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=len(unique), initial=len(unique) - len(todo), desc="grid", disable=not progress)
    channel = Progress("grid cells", len(unique), "cells", start=len(unique) - len(todo))

    def done(cid, err):
        if err:
            failures[cid] = err
        bar.update(1)
        channel.update(1)

    failures: dict[str, str] = {}
    run = (_run_here if workers == 1 or len(todo) <= 1 else _run_in_workers)
    run(todo, cell_fn, out_dir, threads_per_worker, context, min(workers, len(todo)), devices, done)
    bar.close()
    if failures:
        listed = "; ".join(f"{cid}: {err}" for cid, err in sorted(failures.items()))
        raise GridCellError(f"{len(failures)} of {len(unique)} grid cells failed: {listed}")

    rows = []
    for cid, cell in zip(ids, cells):
        rec = read_json(out_dir / f"{cid}.json")
        rows.append({**cell, "id": cid, "elapsed_s": rec["elapsed_s"], **_flatten(rec["result"])})
    df = pd.DataFrame(rows)
    df.attrs["computed"] = [cid for cid, _ in todo]
    df.attrs["stale_recomputed"] = rerun
    return df


def _unique_cells(ids, cells) -> list[tuple[str, dict]]:
    """(id, cell) once per id; two different cells under one id are an error."""
    seen: dict[str, dict] = {}
    for cid, cell in zip(ids, cells):
        if cid in seen and _normalized(seen[cid]) != _normalized(cell):
            raise HDLibError(f"run_grid: two different cells share the id {cid!r}")
        seen[cid] = cell
    return list(seen.items())


def _cells_to_run(unique, out_dir: Path) -> tuple[list, list]:
    """(cells without a result or with a stale one, the ids of the stale ones)."""
    todo, rerun = [], []
    for cid, cell in unique:
        path = out_dir / f"{cid}.json"
        if not path.exists():
            todo.append((cid, cell))
            continue
        try:
            stored = read_json(path).get("cell")
        except (OSError, ValueError) as exc:
            raise StaleResultError(f"{path}: unreadable result file ({exc}); delete it to re-run the cell") from None
        if stored != _normalized(cell):
            # Same id, other content (e.g. the cell's `inputs` key: a changed synthetic set or
            # labeled subset): the stored result is stale and is recomputed, never reported.
            todo.append((cid, cell))
            rerun.append(cid)
    return todo, rerun


def _run_here(todo, cell_fn, out_dir, threads, context, n_workers, devices, done) -> None:
    for cid, cell in todo:
        done(*_run_one(cell_fn, cell, cid, str(out_dir), threads, context))


def _run_in_workers(todo, cell_fn, out_dir, threads, context, n_workers, devices, done) -> None:
    """Cells in spawned worker processes, each pinned to one of `devices` when given."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    init = {}
    if devices:
        queue = ctx.Queue()
        for i in range(n_workers):
            queue.put(str(devices[i % len(devices)]))
        init = {"initializer": _pin_worker_device, "initargs": (queue,)}
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, **init) as pool:
        futures = {pool.submit(_run_one, cell_fn, cell, cid, str(out_dir), threads, context): cid
                   for cid, cell in todo}
        for fut in as_completed(futures):
            try:
                _, err = fut.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by the OS
                err = f"{type(exc).__name__}: {exc}"
            done(futures[fut], err)

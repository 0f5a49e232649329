"""Cell functions for tests/test_grid.py (importable by spawned worker processes)."""

import os
import time
from pathlib import Path


def toy_cell(cell: dict) -> dict:
    """Deterministic toy result; appends one line per call to cell['marker'] if given
    and sleeps cell['sleep'] seconds if given."""
    time.sleep(cell.get("sleep", 0))
    if cell.get("marker"):
        with open(cell["marker"], "a") as fh:
            fh.write(f"{cell['a']},{cell['b']},{os.getpid()}\n")
    if cell.get("fail"):
        raise RuntimeError(f"boom a={cell['a']}")
    return {"sum": cell["a"] + cell["b"], "nested": {"product": cell["a"] * cell["b"], "pair": [cell["a"], 1]}}


def threads_cell(cell: dict) -> dict:
    import torch

    return {"threads": torch.get_num_threads(), "pid": os.getpid(), "cwd_ok": Path.cwd().exists()}


def device_cell(cell: dict) -> dict:
    """The GPU ids this worker may see (CUDA_VISIBLE_DEVICES), and the worker's pid."""
    time.sleep(cell.get("sleep", 0))
    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "pid": os.getpid()}

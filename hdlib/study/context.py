"""The study context: its saved config, device, metrics JSON and required inputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..config import Config, _build, parse_override, resolve_device, set_dotted
from ..errors import HDLibError
from ..io import atomic_write_json
from ..parallel.grid import worker_count, worker_threads
from ..paths import StudyPaths

QUIET_ENV = "HDLIB_QUIET_NOTEBOOK"


def config_from_results(study_dir: str | Path, overrides=()) -> Config:
    """Rebuild the config a stage saved (used by worker processes and tools), with optional
    `key=value` overrides (e.g. the worker's own device)."""
    path = StudyPaths(study_dir).config_json
    data = json.loads(path.read_text())
    for ov in overrides:
        key, value = parse_override(ov)
        set_dotted(data, key, value, f"{path} (override {ov!r})", raw=ov.split("=", 1)[1])
    return _build(Config, data, str(path))


def device(cfg: Config) -> str:
    """The study's device in this process: under a launcher (one process per GPU) a plain `cuda`
    is this rank's GPU, never GPU 0 for every rank."""
    dev = resolve_device(cfg.study.device)
    if dev == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return dev


def launched_rank() -> tuple[int, int]:
    """(rank, world size) of this process under the launcher (torchrun sets RANK and WORLD_SIZE), (0, 1)
    outside it. Read from the environment: accelerate's PartialState() on the CPU reports rank 0 of 1 in
    every process when no process group is asked for, so each rank did the whole request."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    """True outside a launcher and on its rank 0 (torchrun / accelerate set RANK before any group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_file(path: Path, what: str, timeout_s: float = 3600.0, poll_s: float = 0.5) -> Path:
    """Wait until rank 0 has written `path` (atomically); a one-line error after `timeout_s`."""
    start = time.monotonic()
    while not path.exists():
        if time.monotonic() - start > timeout_s:
            raise HDLibError(f"{path}: {what} did not appear within {timeout_s:.0f} s (did rank 0 fail?)")
        time.sleep(poll_s)
    return path


def write_metrics(cfg: Config, stage: str, metrics: dict) -> Path:
    path = StudyPaths(cfg).metrics(stage)
    atomic_write_json(path, metrics)
    return path


def read_metrics(cfg: Config, stage: str, missing_ok: bool = False) -> dict:
    path = StudyPaths(cfg).metrics(stage)
    if not path.exists():
        if missing_ok:
            return {}
        raise HDLibError(f"{path}: missing; run the stage that writes it first")
    return json.loads(path.read_text())


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise HDLibError(f"{path}: missing {what}; run the earlier stages first (python -m hdlib run ...)")
    return path


def grid_devices(cfg: Config) -> list[str] | None:
    """The GPUs the grid's workers share out (one each), when the study runs on CUDA: the visible ones,
    or the one `study.device` names. None on the CPU."""
    dev = device(cfg)
    if not dev.startswith("cuda"):
        return None
    if ":" in dev:
        return [dev.split(":", 1)[1]]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def grid_cell_threads(cfg: Config) -> int | None:
    """torch threads a downstream grid cell trains with (None: the process's own count). A model a cell
    may train first, or a stage outside the grid (the real-only baseline classifier), trains with this
    count wherever it runs: float sums follow the thread count, so its weights would otherwise depend on
    which ran first (a fresh clone, whose committed cells are reused, trained the baselines in the stage)."""
    return worker_threads(worker_count(cfg.study.workers, grid_devices(cfg)))

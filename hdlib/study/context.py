"""The study context: its saved config, device, metrics JSON and required inputs."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, _build, parse_override, resolve_device, set_dotted
from ..errors import HDLibError
from ..io import atomic_write_json
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
    return resolve_device(cfg.study.device)


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

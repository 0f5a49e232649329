"""What every stage shares: notebook setup, the study's device, metrics JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import Config, _build, load_config, resolve_device
from ..errors import HDLibError
from ..io import atomic_write_json
from ..paths import REPO_ROOT, StudyPaths

# Set by the runner: notebooks executed by papermill keep progress bars out of their outputs.
QUIET_ENV = "HDLIB_QUIET_NOTEBOOK"


def setup_notebook(params_file: str, overrides=()) -> Config:
    """Load and validate the study config, work from the repository root (so
    relative paths in params files mean the same in JupyterLab and papermill),
    and save the resolved config for the stages and grid workers."""
    params_file = Path(params_file)
    if not params_file.is_absolute() and not params_file.exists():
        params_file = REPO_ROOT / params_file
    cfg = load_config(params_file, list(overrides))
    os.chdir(REPO_ROOT)
    if os.environ.get(QUIET_ENV) == "1":
        cfg.study.progress = False
    StudyPaths(cfg).root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(StudyPaths(cfg).config_json, cfg.to_dict())
    torch.manual_seed(cfg.study.seed)
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")
    mpl.rcParams["figure.dpi"] = 100
    return cfg


def config_from_results(study_dir: str | Path) -> Config:
    """Rebuild the config a stage saved (used by worker processes)."""
    path = StudyPaths(study_dir).config_json
    return _build(Config, json.loads(path.read_text()), str(path))


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

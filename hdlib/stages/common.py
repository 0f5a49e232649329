"""What every stage shares: notebook setup, the study's device, metrics JSON."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import Config, load_config
from ..io import atomic_write_json
from ..paths import REPO_ROOT, StudyPaths
from ..placement import set_deterministic
from ..study.context import QUIET_ENV, device


def setup_notebook(params_file: str, overrides=()) -> Config:
    """Load and validate the study config, work from the repository root (so
    relative paths in params files mean the same in JupyterLab and papermill),
    and save the resolved config for the stages and grid workers."""
    params_file = Path(params_file)
    if not params_file.is_absolute() and not params_file.exists():
        params_file = REPO_ROOT / params_file
    quiet = ["study.progress=false"] if os.environ.get(QUIET_ENV) == "1" else []
    cfg = load_config(params_file, list(overrides) + quiet)
    os.chdir(REPO_ROOT)
    StudyPaths(cfg).root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(StudyPaths(cfg).config_json, cfg.to_dict())
    torch.manual_seed(cfg.study.seed)
    set_deterministic(device(cfg))
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")
    mpl.rcParams["figure.dpi"] = 100
    root = StudyPaths(cfg).root.resolve()
    shown = root.relative_to(REPO_ROOT) if root.is_relative_to(REPO_ROOT) else root.name  # no absolute path
    print(f"study {cfg.study.name}: results in {shown}; device {device(cfg)}")
    return cfg

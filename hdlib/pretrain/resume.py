"""A pre-training run that outlives a machine: its latest checkpoint and its curves are mirrored
into a folder that is committed (`pretrain.committed_run`, e.g. models/pretrain-run/), and a run on
a fresh clone starts from there instead of from step 0.

    committed_run/
      run_key.json                 the run's recipe (hdlib.pretrain.recipe): a folder holds one run
      checkpoint/step-NNNNNNNN/    the Trainer's complete checkpoint (weights, EMA, optimizer, RNG)
      metrics/                     pretrain_eval.csv (the judge's curve) and the denoiser's log.csv
      curve.png                    that curve drawn (hdlib.pretrain.curve), with the cool-down branches

Every copy is made beside its target and renamed into place, so a kill leaves the old copy whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from ..io import atomic_dir
from ..paths import StudyPaths
from .curve import write_run_curve
from .judges import POOL_JUDGE_DIR
from .recipe import RUN_KEY

CHECKPOINT = "checkpoint"
MIRRORED_METRICS = ("pretrain_eval.csv",)


def _step(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step-*` folders under root, oldest first."""
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / "COMPLETE").exists()] if root.is_dir() else []
    return sorted(found, key=_step)


def _copy_tree(src: Path, dst: Path) -> None:
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _run_key(cfg: Config) -> dict:
    return json.loads(StudyPaths(cfg).metrics(RUN_KEY).read_text())


def seed_from_committed_checkpoint(cfg: Config) -> int:
    """Before training: when the committed run is further than this folder's, copy its checkpoint and
    curves in (the Trainer then resumes from it). A committed run of another recipe is a one-line error.
    Returns the step copied in (0 when nothing was)."""
    folder = cfg.pretrain.committed_run
    if not folder:
        return 0
    root, paths = Path(folder), StudyPaths(cfg)
    if not (root / "run_key.json").exists():
        return 0
    if json.loads((root / "run_key.json").read_text()) != _run_key(cfg):
        raise ConfigError(f"pretrain.committed_run: {root} holds a run of another recipe; give this recipe its own "
                          "folder, or remove that one")
    theirs = complete_checkpoints(root / CHECKPOINT)
    ours = complete_checkpoints(paths.model("denoiser_pretrained") / "checkpoints")
    if not theirs or (ours and _step(ours[-1]) >= _step(theirs[-1])):
        return 0
    src = theirs[-1]
    _copy_tree(src, paths.model("denoiser_pretrained") / "checkpoints" / src.name)
    for name in MIRRORED_METRICS:
        if (root / "metrics" / name).exists():
            _copy_file(root / "metrics" / name, paths.metrics_dir / name)
    if (root / "metrics" / "log.csv").exists():
        _copy_file(root / "metrics" / "log.csv", paths.model("denoiser_pretrained") / "log.csv")
    print(f"[pretrain] resuming from the committed checkpoint {src} (step {_step(src)})", flush=True)
    return _step(src)


def mirror_latest_checkpoint(latest: Path, root: Path, run_key: dict) -> Path:
    """Copy a run's latest complete checkpoint into root/checkpoint/ (removing the one it replaces) beside
    the run's recipe key; returns the copy."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "run_key.json").write_text(json.dumps(run_key, indent=2, sort_keys=True) + "\n")
    dst = root / CHECKPOINT / latest.name
    if not dst.exists():
        _copy_tree(latest, dst)
    for stale in complete_checkpoints(root / CHECKPOINT):
        if stale != dst:
            shutil.rmtree(stale, ignore_errors=True)
    return dst


def committed_rows(cfg: Config, name: str) -> Path:
    """The study folder's metrics/<name> (a branch's or variant's judged rows), copied from the committed run
    first when the folder has none: on a fresh clone the rows judged elsewhere are kept, not overwritten by the
    next mirror. Returns the study folder's path."""
    path = StudyPaths(cfg).metrics_dir / name
    committed = Path(cfg.pretrain.committed_run) / "metrics" / name if cfg.pretrain.committed_run else None
    if not path.exists() and committed is not None and committed.exists():
        _copy_file(committed, path)
    return path


def keep_committed_checkpoint(cfg: Config) -> Path | None:
    """After a chunk: mirror the latest complete checkpoint (replacing the previous one) and the curves
    into the committed folder, for the next `git commit`. Returns the mirrored checkpoint."""
    folder = cfg.pretrain.committed_run
    if not folder:
        return None
    root, paths = Path(folder), StudyPaths(cfg)
    ours = complete_checkpoints(paths.model("denoiser_pretrained") / "checkpoints")
    if not ours:
        return None
    dst = mirror_latest_checkpoint(ours[-1], root, _run_key(cfg))
    judge = paths.cache / POOL_JUDGE_DIR  # the judge the curve was scored with, once (pool_judge reads it)
    if (judge / "judge.json").exists() and not (root / POOL_JUDGE_DIR / "judge.json").exists():
        _copy_tree(judge, root / POOL_JUDGE_DIR)
    for name in MIRRORED_METRICS:
        if (paths.metrics_dir / name).exists():
            _copy_file(paths.metrics_dir / name, root / "metrics" / name)
    log = paths.model("denoiser_pretrained") / "log.csv"
    if log.exists():
        _copy_file(log, root / "metrics" / "log.csv")
    write_run_curve(root, Path(cfg.pretrain.export_dir) / "card.json" if cfg.pretrain.export_dir else None)
    return dst

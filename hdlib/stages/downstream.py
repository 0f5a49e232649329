"""Stage 05: the downstream grid (label fraction x training set x ratio x seed).

Each cell trains the downstream classifier on real (+ synthetic) images, selects
on the validation split and evaluates once on test. A cell carries a content key
of its inputs (labeled subset, chosen synthetic images, settings), so a changed
upstream input re-runs exactly the cells that use it."""

from __future__ import annotations

import hashlib
import json
import os

from ..config import Config
from ..paths import REPO_ROOT, StudyPaths
from .common import config_from_results
from .data import fraction_indices, load_target, manifest_hash
from .synthesis import fit_image_classifier, synthetic_training_images

ID_KEYS = ["fraction", "training_set", "ratio", "seed"]


def _settings_key(cfg: Config) -> str:
    blob = json.dumps({"downstream": cfg.downstream.__dict__, "image_size": cfg.data.image_size,
                       "classes": cfg.data.classes}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cell_inputs_key(cfg: Config, training_set: str, fraction: float, ratio: float) -> str:
    """Content key of everything a cell learns from and is judged on."""
    _, _, syn_key = synthetic_training_images(cfg, training_set, fraction, ratio)
    parts = [manifest_hash(cfg, "target_train", fraction), manifest_hash(cfg, "target_val"),
             manifest_hash(cfg, "target_test"), syn_key, _settings_key(cfg)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def downstream_cells(cfg: Config) -> list[dict]:
    ds = cfg.downstream
    cells, keys = [], {}

    def add(f, s, r, seed):
        r = 0.0 if s == "real" else r
        if (f, s, r) not in keys:
            keys[(f, s, r)] = cell_inputs_key(cfg, s, f, r)
        cell = {"fraction": f, "training_set": s, "ratio": r, "seed": seed, "inputs": keys[(f, s, r)]}
        if cell not in cells:
            cells.append(cell)

    for seed in ds.seeds:
        for f in ds.fractions:
            for s in ds.training_sets:
                add(f, s, ds.ratio, seed)
        for r in ds.ratio_sweep:
            for s in ds.ratio_sweep_sets:
                add(ds.ratio_sweep_fraction, s, r, seed)
    return cells


def run_downstream_cell(cell: dict) -> dict:
    """One grid cell (runs in a worker process)."""
    from ..downstream import evaluate

    os.chdir(REPO_ROOT)
    cfg = config_from_results(cell["study_dir"])
    cfg.study.progress = False
    t = load_target(cfg)
    idx = fraction_indices(cfg, cell["fraction"])
    x, y = t["train_images"][idx], t["train_labels"][idx]
    sx, sy, _ = synthetic_training_images(cfg, cell["training_set"], cell["fraction"], cell["ratio"])
    n_syn = 0 if sx is None else len(sx)
    ds = cfg.downstream
    # every cell sees the real images equally often; synthetic ones come on top (ratio per real image)
    model, _ = fit_image_classifier(cfg, ds.backbone, ds.train, x, y, t["val_images"], t["val_labels"],
                                    seed=1000 + int(cell["seed"]), progress=False,
                                    synthetic=(sx, sy) if n_syn else None, synthetic_per_real=cell["ratio"])
    names = list(cfg.data.classes)
    test = evaluate(model, t["test_images"], t["test_labels"], num_classes=len(names), class_names=names)
    val = evaluate(model, t["val_images"], t["val_labels"], num_classes=len(names), class_names=names)
    return {"n_real": int(len(idx)), "n_synthetic": n_syn, "test": test,
            "val_balanced_accuracy": val["balanced_accuracy"], "val_accuracy": val["accuracy"]}


def run_downstream_grid(cfg: Config):
    """All cells (resumable; stale cells recomputed). Returns the results frame."""
    from ..grid import run_grid

    cells = downstream_cells(cfg)
    # where the study lives is context, not part of a cell: a moved study keeps its cells
    return run_grid(cells, "hdlib.stages.downstream:run_downstream_cell", StudyPaths(cfg).grid,
                    workers=cfg.study.workers, id_keys=ID_KEYS, progress=cfg.study.progress,
                    context={"study_dir": str(cfg.results_dir)})

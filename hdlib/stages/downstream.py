"""Stage 05: the downstream grid (label fraction x training set x ratio x seed).

Each cell trains the downstream classifier on real (+ synthetic) images, selects
on the validation split and evaluates once on test. A cell carries a content key
of its inputs (labeled subset, chosen synthetic images, settings), so a changed
upstream input re-runs exactly the cells that use it."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from ..config import Config
from ..downstream import evaluate
from ..grid import run_grid
from ..paths import REPO_ROOT, StudyPaths
from ..study.classifiers import fit_image_classifier
from ..study.context import config_from_results
from ..study.splits import fraction_indices, manifest_hash, split_images, split_labels
from ..study.synthetic_sets import synthetic_training_images

ID_KEYS = ["fraction", "training_set", "ratio", "seed"]


def _settings_key(cfg: Config) -> str:
    blob = json.dumps({"downstream": cfg.downstream.__dict__, "image_size": cfg.data.image_size,
                       "classes": cfg.data.classes}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cell_inputs_key(cfg: Config, training_set: str, fraction: float, ratio: float, draw: int) -> str:
    """Content key of everything a cell learns from and is judged on."""
    _, _, syn_key = synthetic_training_images(cfg, training_set, fraction, ratio, draw)
    parts = [manifest_hash(cfg, "target_train", fraction, draw), manifest_hash(cfg, "target_val"),
             manifest_hash(cfg, "target_test"), syn_key, _settings_key(cfg)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


ABLATION_SETS = ("scratch", "classifier_free")  # generated at the smallest fraction only (CPU budget)


def downstream_cells(cfg: Config) -> list[dict]:
    """Every cell: seed (= label draw: the labeled subset, latent classifier and synthetic
    images are all re-drawn per seed) x fraction x training set x ratio."""
    ds = cfg.downstream
    f0 = min(ds.fractions)
    cells = []

    def add(f, s, r, seed):
        if s in ABLATION_SETS and f != f0:
            return
        r = 0.0 if s == "real" else r
        cell = {"fraction": f, "training_set": s, "ratio": r, "seed": seed,
                "inputs": cell_inputs_key(cfg, s, f, r, seed)}
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
    """One grid cell (runs in a worker process): real labeled subset of the cell's draw
    (+ synthetic images of the same draw), class-balanced batches, the same passes over the
    real images in every cell, model selection on validation, test evaluated once."""

    os.chdir(REPO_ROOT)
    cfg = config_from_results(cell["study_dir"], ["study.progress=false"])
    f, draw = cell["fraction"], int(cell["seed"])
    idx = fraction_indices(cfg, f, draw)
    x, y = split_images(cfg, "target_train", idx), split_labels(cfg, "target_train")[idx]
    sx, sy, _ = synthetic_training_images(cfg, cell["training_set"], f, cell["ratio"], draw)
    n_syn = 0 if sx is None else len(sx)
    ds = cfg.downstream
    vx, vy = split_images(cfg, "target_val"), split_labels(cfg, "target_val")
    model, _ = fit_image_classifier(cfg, ds.backbone, ds.train, x, y, vx, vy, seed=1000 + draw, progress=False,
                                    synthetic=(sx, sy) if n_syn else None, synthetic_per_real=cell["ratio"])
    names = list(cfg.data.classes)
    test = evaluate(model, split_images(cfg, "target_test"), split_labels(cfg, "target_test"),
                    num_classes=len(names), class_names=names)
    val = evaluate(model, vx, vy, num_classes=len(names), class_names=names)
    per_class_real = np.bincount(y.numpy(), minlength=len(names))
    return {"n_real": int(len(idx)), "n_synthetic": n_syn, "labels_per_class": int(per_class_real.min()),
            "test": test, "val_balanced_accuracy": val["balanced_accuracy"], "val_accuracy": val["accuracy"]}


def run_downstream_grid(cfg: Config):
    """All cells (resumable; stale cells recomputed). Returns the results frame."""

    cells = downstream_cells(cfg)
    # where the study lives is context, not part of a cell: a moved study keeps its cells
    return run_grid(cells, "hdlib.stages.downstream:run_downstream_cell", StudyPaths(cfg).grid,
                    workers=cfg.study.workers, id_keys=ID_KEYS, progress=cfg.study.progress,
                    context={"study_dir": str(cfg.results_dir)})

"""The downstream grid's cells (label fraction x training set x ratio x seed), used by
stage 03 (the real-only sweep that fixes the primary cell) and stage 05 (the whole grid).

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
from ..evaluation.downstream import evaluate
from ..parallel.grid import cell_id, remove_other_results, run_grid, worker_count
from ..paths import REPO_ROOT, StudyPaths
from .classifiers import fit_image_classifier, real_only_seed, store_baseline
from .context import config_from_results, device, grid_devices
from .splits import (
    draws_for,
    fraction_indices,
    has_shifted_cohort,
    manifest_hash,
    smallest_fraction,
    split_images,
    split_labels,
    validation_set,
)
from .synthetic_sets import added_training_images

ID_KEYS = ["fraction", "training_set", "ratio", "seed"]


def _settings_key(cfg: Config) -> str:
    # the lambda candidates matter only to cells with added images: cell_inputs_key adds them there
    settings = {k: v for k, v in cfg.downstream.__dict__.items() if k != "synthetic_loss_weights"}
    # the training precision changes the weights as much as any downstream setting does
    blob = json.dumps({"downstream": settings, "image_size": cfg.data.image_size, "classes": cfg.data.classes,
                       "mixed_precision": cfg.study.mixed_precision}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cell_inputs_key(cfg: Config, training_set: str, fraction: float, ratio: float, draw: int) -> str:
    """Content key of everything a cell learns from and is judged on."""
    _, _, syn_key = added_training_images(cfg, training_set, fraction, ratio, draw)
    parts = [manifest_hash(cfg, "target_train", fraction, draw), validation_set(cfg, fraction, draw)[2],
             manifest_hash(cfg, "target_test"), syn_key, _settings_key(cfg)]
    if has_shifted_cohort(cfg):  # a cell is judged on it too (absent: the key is the one before cohorts existed)
        parts.append("shifted:" + manifest_hash(cfg, "target_test_shifted"))
    if syn_key:  # the loss over added images (mean real + lambda x mean added) and its lambda candidates
        lambdas = [float(v) for v in cfg.downstream.synthetic_loss_weights]
        parts.append("loss=real+lambda*added:" + json.dumps(lambdas))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


ABLATION_SETS = ("scratch", "classifier_free")  # generated at the smallest fraction only (CPU budget)


def downstream_cells(cfg: Config, primary: float | None = None, training_sets=None) -> list[dict]:
    """Every cell: seed (= label draw: the labeled subset, latent classifier and synthetic
    images are all re-drawn per seed) x fraction x training set x ratio. The seeds of a
    fraction are `draws_for(cfg, fraction, primary)`; `training_sets` restricts the sets."""
    ds = cfg.downstream
    sets = [s for s in ds.training_sets if training_sets is None or s in training_sets]
    f0 = smallest_fraction(cfg)
    cells = []

    def add(f, s, r, seed):
        if s in ABLATION_SETS and f != f0:
            return
        r = 0.0 if s == "real" else r
        cell = {"fraction": f, "training_set": s, "ratio": r, "seed": seed,
                "inputs": cell_inputs_key(cfg, s, f, r, seed)}
        if cell not in cells:
            cells.append(cell)

    for f in ds.fractions:
        for seed in draws_for(cfg, f, primary):
            for s in sets:
                add(f, s, ds.ratio, seed)
    for seed in draws_for(cfg, ds.ratio_sweep_fraction, primary):
        for r in ds.ratio_sweep:
            for s in ds.ratio_sweep_sets:
                if training_sets is None or s in training_sets:
                    add(ds.ratio_sweep_fraction, s, r, seed)
    return cells


def run_downstream_cell(cell: dict) -> dict:
    """One grid cell (runs in a worker process): real labeled subset of the cell's draw
    (+ synthetic images of the same draw), class-balanced batches, the same passes over the
    real images in every cell, model selection on validation, test evaluated once. With
    added images and several downstream.synthetic_loss_weights, one model per lambda is
    trained and the one with the best validation accuracy kept (ties: the smaller lambda);
    the result records the chosen `synthetic_loss_weight` and `val_accuracy_by_lambda`."""

    os.chdir(REPO_ROOT)
    cfg = config_from_results(cell["study_dir"], ["study.progress=false"] +
                              ([f"study.device={cell['device']}"] if "device" in cell else []))
    f, draw = cell["fraction"], int(cell["seed"])
    idx = fraction_indices(cfg, f, draw)
    x, y = split_images(cfg, "target_train", idx), split_labels(cfg, "target_train")[idx]
    sx, sy, _ = added_training_images(cfg, cell["training_set"], f, cell["ratio"], draw)
    n_syn = 0 if sx is None else len(sx)
    ds = cfg.downstream
    vx, vy, _ = validation_set(cfg, f, draw)  # the draw's labeled validation images (inside its budget)
    names = list(cfg.data.classes)

    def fit(lam, keep_history=False):
        model, history = fit_image_classifier(
            cfg, ds.backbone, ds.train, x, y, vx, vy, seed=real_only_seed(draw), progress=False,
            synthetic=(sx, sy) if n_syn else None, synthetic_per_real=cell["ratio"], synthetic_loss_weight=lam)
        return (model, history) if keep_history else model

    def score(model):
        return evaluate(model, vx, vy, num_classes=len(names), class_names=names, device=device(cfg))

    if n_syn:  # one model per lambda candidate; the best on validation is kept and tested
        model, lam, val, val_by_lambda = select_synthetic_loss_weight(fit, ds.synthetic_loss_weights, score)
    else:
        model, history = fit(None, keep_history=True)
        val = score(model)
        if cell["training_set"] == "real":  # the same model is the draw's baseline (filter, pseudo-labels)
            store_baseline(cfg, f, draw, model, history)
    per_class_real = np.bincount(y.numpy(), minlength=len(names))
    out = {"n_real": int(len(idx)), "n_synthetic": n_syn, "labels_per_class": int(per_class_real.min()),
           "test": test_scores(cfg, model), "val_balanced_accuracy": val["balanced_accuracy"],
           "val_accuracy": val["accuracy"]}
    if has_shifted_cohort(cfg):  # the secondary endpoint: the same model on the shifted cohort
        out["test_shifted"] = test_scores(cfg, model, "target_test_shifted")
    if n_syn:
        out["synthetic_loss_weight"] = lam
        out["val_accuracy_by_lambda"] = {f"{v:g}": acc for v, acc in val_by_lambda.items()}
    return out


def test_scores(cfg: Config, model, split: str = "target_test") -> dict:
    """A trained classifier's scores on a test cohort (evaluated once, never used to choose)."""
    names = list(cfg.data.classes)
    return evaluate(model, split_images(cfg, split), split_labels(cfg, split), num_classes=len(names),
                    class_names=names, device=device(cfg))


def select_synthetic_loss_weight(fit, lambdas, score):
    """Train one model per lambda (`fit(lambda)` -> model) and keep the one whose validation
    metrics (`score(model)` -> dict with "accuracy") have the best accuracy; ties: the
    smaller lambda. Only the kept model is held. Returns (model, lambda, its validation
    metrics, {lambda: validation accuracy} of every candidate)."""
    best, accs = None, {}
    for lam in sorted({float(v) for v in lambdas}):
        model = fit(lam)
        metrics = score(model)
        accs[lam] = float(metrics["accuracy"])
        if best is None or metrics["accuracy"] > best[2]["accuracy"]:  # strict: ties keep the smaller lambda
            best = (model, lam, metrics)
        del model
    return (*best, accs)


def run_downstream_grid(cfg: Config, primary: float | None = None, training_sets=None):
    """The cells of `downstream_cells` (resumable; stale cells recomputed; a cell another
    run already computed with the same content key is reused). With a primary cell and every
    training set (stage 05's whole grid), result files of cells the grid does not hold (an
    earlier run's seeds or label counts) are deleted (`attrs["removed_other_runs"]`).
    Returns the results frame."""
    cells = downstream_cells(cfg, primary, training_sets)
    devices = grid_devices(cfg)
    workers = worker_count(cfg.study.workers, devices)
    pinned = devices if devices and workers > 1 else None  # one GPU: its cells run in this process
    # where the study lives is context, not part of a cell: a moved study keeps its cells; a worker
    # pinned to one GPU sees it as `cuda`
    context = {"study_dir": str(cfg.results_dir), **({"device": "cuda"} if pinned else {})}
    results = run_grid(cells, "hdlib.study.grid_cells:run_downstream_cell", StudyPaths(cfg).grid,
                       workers=workers, id_keys=ID_KEYS, progress=cfg.study.progress,
                       context=context, devices=pinned)
    if primary is not None and training_sets is None:  # the whole grid: any other cell is an earlier run's
        results.attrs["removed_other_runs"] = remove_other_results(StudyPaths(cfg).grid,
                                                                   {cell_id(c, ID_KEYS) for c in cells})
    return results

"""Image classifiers the study trains once and caches by content (the reference judge,
the real-only baseline) and the selective filter built on the baseline."""

from __future__ import annotations

import json

import numpy as np
import torch

from ..config import Config, TrainingConfig
from ..errors import ConfigError
from ..evaluation.downstream import (
    ClassifierOptions,
    build_classifier,
    extract_features,
    train_classifier,
)
from ..io import atomic_torch_save, atomic_write_csv, atomic_write_json
from ..parallel.threads import torch_threads
from ..paths import StudyPaths, model_name
from ..sampling.filtering import FeatureFilter, calibrate_delta
from .context import device, grid_cell_threads
from .splits import (
    fraction_indices,
    manifest_hash,
    split_images,
    split_labels,
    validation_set,
)


def fit_image_classifier(cfg: Config, backbone: str, tcfg: TrainingConfig, x, y, vx, vy, seed: int,
                         progress: bool | None = None, out_dir=None, synthetic=None, synthetic_per_real: float = 0.0,
                         synthetic_loss_weight: float | None = None):
    """Train a downstream-style image classifier with the study's one Trainer (every
    TrainingConfig field applies); class-balanced batches; model selection on (vx, vy) only.
    Images may be uint8 tensors or datasets streamed from disk. `synthetic` = (images,
    labels) added at `synthetic_per_real` synthetic images per real one; their mean loss
    is weighted by `synthetic_loss_weight` (lambda; None = the one lambda of
    downstream.synthetic_loss_weights, which must then hold exactly one)."""

    sx, sy = synthetic if synthetic is not None else (None, None)
    if synthetic_loss_weight is None:
        lambdas = cfg.downstream.synthetic_loss_weights
        if synthetic is not None and len(lambdas) != 1:
            raise ConfigError(f"fit_image_classifier: downstream.synthetic_loss_weights has {len(lambdas)} "
                              "candidates; pass synthetic_loss_weight")
        synthetic_loss_weight = lambdas[0] if len(lambdas) == 1 else 1.0
    options = ClassifierOptions(
        num_classes=len(cfg.data.classes), backbone=backbone, balanced=True, augment=True,
        eval_every=cfg.downstream.eval_every or max(1, tcfg.max_steps // 5), synthetic_images=sx, synthetic_labels=sy,
        synthetic_per_real=synthetic_per_real, synthetic_loss_weight=float(synthetic_loss_weight),
        pretrained_weights=cfg.downstream.pretrained_weights or None, num_workers=cfg.data.num_workers,
        mixed_precision=cfg.study.mixed_precision, device=cfg.study.device, max_memory_gb=cfg.study.max_memory_gb,
        progress=cfg.study.progress if progress is None else progress,
        out_dir=out_dir, seed=seed)
    return train_classifier(x, y, vx, vy, tcfg, options)


def _classifier_key(cfg: Config, backbone: str, tcfg: TrainingConfig, data_key: str, seed: int) -> dict:
    return {"backbone": backbone, "train": vars(tcfg), "seed": int(seed), "eval_every": cfg.downstream.eval_every,
            "weights": cfg.downstream.pretrained_weights, "image_size": cfg.data.image_size, "data": data_key,
            "mixed_precision": cfg.study.mixed_precision}


def _store_classifier(folder, key: dict, model, history) -> None:
    atomic_torch_save(model.state_dict(), folder / "model.pt")
    atomic_write_csv(history, folder / "history.csv")
    atomic_write_json(folder / "settings.json", key)  # last: it marks the folder complete


def _cached_classifier(cfg: Config, name: str, backbone: str, fit, tcfg: TrainingConfig, data_key: str,
                       seed: int | None = None):
    """Train once with `fit()`; the cache is keyed by the training settings, the seed and the
    content of the labeled images it learns from (`data_key`)."""

    folder = StudyPaths(cfg).model(name)
    key = _classifier_key(cfg, backbone, tcfg, data_key, cfg.study.seed if seed is None else seed)
    key_path, path = folder / "settings.json", folder / "model.pt"
    model = build_classifier(backbone, num_classes=len(cfg.data.classes), image_size=cfg.data.image_size)
    if path.exists() and key_path.exists() and json.loads(key_path.read_text()) == json.loads(json.dumps(key)):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    trained, history = fit()
    _store_classifier(folder, key, trained, history)
    return trained.eval()


def reference_classifier(cfg: Config):
    """Trained once on ALL the target's training labels (model selection on val): the
    independent judge of sample class and the feature space for FID/KID. It reports;
    it never chooses anything."""
    ds = cfg.downstream
    data_key = manifest_hash(cfg, "target_train") + manifest_hash(cfg, "target_val")
    return _cached_classifier(cfg, model_name("reference_classifier"), ds.reference_backbone, lambda: fit_image_classifier(
        cfg, ds.reference_backbone, ds.reference_train, split_images(cfg, "target_train"),
        split_labels(cfg, "target_train"), split_images(cfg, "target_val"), split_labels(cfg, "target_val"),
        seed=cfg.study.seed), ds.reference_train, data_key)


def real_only_seed(draw: int) -> int:
    """Training seed of label draw `draw`'s real-only classifier: the downstream grid's
    real-only cell and the baseline below are one model, trained once."""
    return 1000 + int(draw)


def _baseline_key(cfg: Config, fraction: float, draw: int) -> dict:
    ds = cfg.downstream
    data_key = manifest_hash(cfg, "target_train", fraction, draw) + validation_set(cfg, fraction, draw)[2]
    return _classifier_key(cfg, ds.backbone, ds.train, data_key, real_only_seed(draw))


def store_baseline(cfg: Config, fraction: float, draw: int, model, history) -> None:
    """Keep the real-only grid cell's model as the draw's baseline classifier (the grid cell
    trains it with the same data, settings and seed `baseline_classifier` would)."""
    _store_classifier(StudyPaths(cfg).model(model_name("baseline_classifier", fraction, draw=draw)),
                      _baseline_key(cfg, fraction, draw), model, history)


def baseline_classifier(cfg: Config, fraction: float, draw: int):
    """Real-only classifier on one labeled subset (the real-only grid cell's model when that
    ran first): its features and confidence drive filtering and the pseudo-labels."""
    ds = cfg.downstream
    idx = fraction_indices(cfg, fraction, draw)
    vx, vy, _ = validation_set(cfg, fraction, draw)
    key = _baseline_key(cfg, fraction, draw)

    def fit():  # with a grid cell's thread count: the real-only cell may train this model first
        with torch_threads(grid_cell_threads(cfg)):
            return fit_image_classifier(cfg, ds.backbone, ds.train, split_images(cfg, "target_train", idx),
                                        split_labels(cfg, "target_train")[idx], vx, vy, seed=real_only_seed(draw))

    return _cached_classifier(cfg, model_name("baseline_classifier", fraction, draw=draw), ds.backbone, fit,
                              ds.train, key["data"], seed=key["seed"])


class SelectiveFilter(FeatureFilter):
    """The paper's selective filter for one labeled subset (fraction, draw): nearest real
    class centroid = target class, baseline confidence >= tau, and no near copy of a
    labeled training image (threshold per class, calibrated on real validation images)."""

    def __init__(self, cfg: Config, fraction: float, draw: int):
        self.cfg, self.fraction, self.draw = cfg, fraction, draw
        model, dev = baseline_classifier(cfg, fraction, draw), device(cfg)
        idx = fraction_indices(cfg, fraction, draw)
        real_f = extract_features(model, split_images(cfg, "target_train", idx), batch_size=128, device=dev)
        real_y = split_labels(cfg, "target_train")[idx]
        K = len(cfg.data.classes)
        if cfg.filtering.delta >= 0:
            delta = np.full(K, cfg.filtering.delta)
        else:
            vx, vy, _ = validation_set(cfg, fraction, draw)  # inside the label budget
            val_f = extract_features(model, vx, batch_size=128, device=dev)
            delta = calibrate_delta(real_f.numpy(), real_y.numpy(), val_f.numpy(), vy.numpy(), K,
                                    percentile=cfg.filtering.delta_percentile)
        super().__init__(model, real_f, real_y, delta, cfg.filtering.tau, cfg.data.classes, train_index=idx,
                         device=dev, selection=cfg.filtering.selection, seed=cfg.study.seed)

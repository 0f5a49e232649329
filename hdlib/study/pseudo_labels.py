"""The rival that uses the same unlabeled target images as HistoDiffusion, without
generation: confidence-thresholded pseudo-labels from the real-only classifier
(self-training, one round; e.g. Lee 2013, "Pseudo-Label"). The unlabeled images are the
target's training images outside a draw's labeled subset (the images `target_unlabeled`
adaptation fine-tunes on); their true labels are never read."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..evaluation.downstream import predict
from ..io import atomic_write_csv, files_sha1
from ..paths import StudyPaths, model_name
from .classifiers import baseline_classifier
from .context import device, is_main_rank, wait_for_file
from .splits import fraction_indices, fraction_labels, labeled_val_indices, split_images


def unlabeled_rows(cfg: Config, fraction: float, draw: int) -> np.ndarray:
    """target_train rows outside the draw's labeled subset (training and validation)."""
    n = len(split_images(cfg, "target_train"))
    labeled = np.concatenate([fraction_indices(cfg, fraction, draw), labeled_val_indices(cfg, fraction, draw)])
    return np.setdiff1d(np.arange(n), labeled)


def pseudo_label_table(cfg: Config, fraction: float, draw: int) -> pd.DataFrame:
    """Rows (train_index, pred, confidence) of every unlabeled image, predicted by the draw's
    real-only baseline classifier; cached next to it, keyed by its weights and the rows."""
    folder = StudyPaths(cfg).model(model_name("baseline_classifier", fraction, draw=draw))
    model = baseline_classifier(cfg, fraction, draw)
    rows = unlabeled_rows(cfg, fraction, draw)
    key = hashlib.sha1((files_sha1([folder / "model.pt"]) + rows.tobytes().hex()).encode()).hexdigest()
    path = folder / f"pseudo_labels-{key[:12]}.csv"
    if not is_main_rank():  # under a launcher, rank 0 predicts and writes; the others read its table
        wait_for_file(path, "the pseudo-label table rank 0 writes")
    if path.exists():
        return pd.read_csv(path)
    if len(rows) == 0:  # every training image is labeled (e.g. the all-labels fraction): nothing to add
        return pd.DataFrame({"train_index": rows, "pred": rows, "confidence": np.zeros(0)})
    # the table is computed once and then read from disk, so computing it must leave the global RNG as it
    # was (its DataLoader draws a seed): else a latent classifier built after it (hdlib.study.train.build_task)
    # would start from other weights when the table was not cached yet than when it was
    with torch.random.fork_rng(devices=[]):
        probs, pred = predict(model, split_images(cfg, "target_train", rows), batch_size=128, device=device(cfg))
    table = pd.DataFrame({"train_index": rows, "pred": pred.numpy(),
                          "confidence": probs.max(1).values.numpy().astype(np.float64)})
    atomic_write_csv(table, path)
    return table


def confident_pseudo_labels(cfg: Config, fraction: float, draw: int, threshold: float) -> pd.DataFrame:
    """Every unlabeled image of the draw whose pseudo-label has confidence >= threshold
    (train_index, pred, confidence): the latent classifier's extra training rows."""
    table = pseudo_label_table(cfg, fraction, draw)
    return table[table["confidence"] >= threshold].sort_values("train_index").reset_index(drop=True)


def choose_pseudo_labeled(table: pd.DataFrame, real_counts: np.ndarray, ratio: float, threshold: float) -> pd.DataFrame:
    """Per class, the round(ratio x real count) most confident images predicted as that class
    with confidence >= threshold (fewer if fewer pass; the shortfall is visible in the counts)."""
    parts = []
    for c, n_real in enumerate(real_counts):
        g = table[(table["pred"] == c) & (table["confidence"] >= threshold)]
        parts.append(g.sort_values(["confidence", "train_index"], ascending=[False, True]).head(int(round(ratio * n_real))))
    return pd.concat(parts).reset_index(drop=True)


def pseudo_label_images(cfg: Config, fraction: float, ratio: float, draw: int):
    """(dataset, pseudo-labels, content key) of the images the rival adds to one labeled subset."""
    real_counts = np.bincount(fraction_labels(cfg, fraction, draw).numpy(), minlength=len(cfg.data.classes))
    chosen = choose_pseudo_labeled(pseudo_label_table(cfg, fraction, draw), real_counts, ratio,
                                   cfg.downstream.pseudo_label_threshold)
    rows = chosen["train_index"].to_numpy()
    key = hashlib.sha1(chosen.to_csv(index=False).encode()).hexdigest()
    return split_images(cfg, "target_train", rows), torch.tensor(chosen["pred"].to_numpy(), dtype=torch.long), key

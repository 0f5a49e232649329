"""Image-quality and classification metrics.

Quality metrics (FID, KID, precision/recall) work on precomputed feature
vectors: there are no Inception weights offline, so the feature space is the
penultimate layer of our own reference classifier; Inception FID is available
only when a local weights file is given (`inception_fid`). Classification
metrics feed the downstream grid; statistics over seeds are in `hdlib.evaluation.stats`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DataError, HDLibError

__all__ = [
    "classification_metrics",
    "fid_kid",
    "frechet_distance",
    "inception_fid",
    "precision_recall",
]

# File torch-fidelity (and so torchmetrics' FID with feature=2048) loads its weights from.
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


# ---------------------------------------------------------------------------
# Feature statistics and distances
# ---------------------------------------------------------------------------

def as_features(x, name: str) -> np.ndarray:
    """Features as a float64 (N, d) array; a clear error for anything else."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"{name}: expected a 2-D (N, d) feature array, got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise DataError(f"{name}: features contain NaN or inf")
    return x


def frechet_distance(real_features, fake_features) -> float:
    """Frechet distance between the Gaussians fitted to two (N, d) feature sets, by torchmetrics' FID (the
    one implementation hdlib uses, here on precomputed features): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = torch.from_numpy(as_features(real_features, "real_features"))
    fake = torch.from_numpy(as_features(fake_features, "fake_features"))
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"frechet_distance: feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if min(len(real), len(fake)) < 2:
        raise DataError(f"frechet_distance: need at least 2 samples in each set, got {len(real)} and {len(fake)}")
    fid = FrechetInceptionDistance(feature=_PrecomputedFeatures(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


class _PrecomputedFeatures(nn.Module):
    """Identity 'feature extractor' so torchmetrics' FID/KID can take feature vectors directly."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_kid(real_features, fake_features, kid_subset_size: int | None = None, kid_subsets: int = 50,
            seed: int = 0) -> dict:
    """FID and KID (mean, std over `kid_subsets` random subsets of `kid_subset_size`,
    default min(1000, n_real, n_fake)) between two (N, d) feature sets, via torchmetrics."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real = torch.from_numpy(as_features(real_features, "real_features"))
    fake = torch.from_numpy(as_features(fake_features, "fake_features"))
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"fid_kid: feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    n_min = min(len(real), len(fake))
    if n_min < 2:
        raise DataError(f"fid_kid: need at least 2 real and 2 fake samples, got {len(real)} and {len(fake)}")
    subset = min(1000, n_min) if kid_subset_size is None else int(kid_subset_size)
    if not 2 <= subset <= n_min:
        raise DataError(f"fid_kid: kid_subset_size={subset} must be in [2, {n_min}] "
                        f"(real {len(real)}, fake {len(fake)} samples)")
    d = real.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KID's "saves all features in a buffer" notice
        kid = KernelInceptionDistance(feature=_PrecomputedFeatures(d), subsets=int(kid_subsets), subset_size=subset)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    # torchmetrics draws KID subsets from the global torch RNG: seed it inside a
    # fork so the caller's RNG state is left exactly as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": frechet_distance(real_features, fake_features), "kid_mean": float(kid_mean),
            "kid_std": float(kid_std)}


def precision_recall(real_features, fake_features, k: int = 3, chunk_size: int = 1024) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the real (fake) manifold
    is the union of balls reaching each sample's k-th nearest neighbour; precision is the
    share of fake samples inside the real manifold, recall the share of real samples
    inside the fake manifold."""
    real = torch.from_numpy(as_features(real_features, "real_features"))
    fake = torch.from_numpy(as_features(fake_features, "fake_features"))
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"precision_recall: feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise DataError(f"precision_recall: need more than k={k} samples in each set, "
                        f"got {len(real)} real and {len(fake)} fake")

    def kth_radius(x: torch.Tensor) -> torch.Tensor:
        # k+1 smallest because each point is its own nearest neighbour at distance 0.
        return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk_size)])

    def inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        return torch.cat([(torch.cdist(c, centres) <= radii[None, :]).any(dim=1) for c in points.split(chunk_size)])

    r_real, r_fake = kth_radius(real), kth_radius(fake)
    return {"precision": float(inside(fake, real, r_real).double().mean()),
            "recall": float(inside(real, fake, r_fake).double().mean())}


def inception_fid(real_images: torch.Tensor, fake_images: torch.Tensor, weights_path: str | Path | None,
                  batch_size: int = 64, device: str = "cpu") -> float:
    """FID in the standard Inception-v3 (2048-d pool) space, from a LOCAL torch-fidelity
    weights file (`pt_inception-2015-12-05-6726825d.pth`); never downloads."""
    if not weights_path:
        raise HDLibError(f"inception_fid needs a local Inception weights file ({INCEPTION_WEIGHTS_FILE} "
                         "from torch-fidelity); none given and nothing is downloaded")
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise DataError(f"{weights_path}: Inception weights file not found (expected {INCEPTION_WEIGHTS_FILE})")
    for name, x in (("real_images", real_images), ("fake_images", fake_images)):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or len(x) < 2:
            raise DataError(f"inception_fid: {name} must be uint8 (N>=2, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise HDLibError("inception_fid needs the torch-fidelity package (pip install torch-fidelity)") from None
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights_path),
                                   normalize=False).to(device)
    for x, real in ((real_images, True), (fake_images, False)):
        for batch in x.split(batch_size):
            fid.update(batch.to(device), real=real)
    return float(fid.compute())


# ---------------------------------------------------------------------------
# Classification metrics
# ---------------------------------------------------------------------------

def _labels(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1 or (x.size and not np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{name}: expected a 1-D integer label array, got {x.dtype} {x.shape}")
    return x.astype(np.int64)


def classification_metrics(y_true, y_pred, num_classes: int, class_names: Sequence[str] | None = None) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class sensitivity and specificity
    (one-vs-rest) and the confusion matrix (rows = true, columns = predicted).
    Classes absent from y_true get NaN sensitivity and are left out of the averages."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
    )

    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise DataError(f"classification_metrics: y_true and y_pred need the same non-zero length, "
                        f"got {len(y_true)} and {len(y_pred)}")
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != num_classes:
        raise DataError(f"classification_metrics: {len(names)} class_names for num_classes={num_classes}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"classification_metrics: {name} has labels outside [0, {num_classes})")

    labels = np.arange(num_classes)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    negatives = len(y_true) - support
    tn = negatives - (predicted - tp)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(support > 0, tp / support, np.nan)
        specificity = np.where(negatives > 0, tn / negatives, np.nan)
    present = support > 0
    # F1 over the classes seen in y_true or y_pred (sklearn's default set); zero
    # division gives 0 there, so a class predicted but never true still counts.
    seen = labels[present | (predicted > 0)]
    macro_f1 = f1_score(y_true, y_pred, labels=seen, average="macro", zero_division=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": handled as documented
        balanced = balanced_accuracy_score(y_true, y_pred)  # mean recall over classes present in y_true
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(macro_f1),
        "macro_sensitivity": float(sensitivity[present].mean()),
        "macro_specificity": float(np.nanmean(specificity)) if np.isfinite(specificity).any() else float("nan"),
        "sensitivity": {n: float(v) for n, v in zip(names, sensitivity)},
        "specificity": {n: float(v) for n, v in zip(names, specificity)},
        "support": {n: int(v) for n, v in zip(names, support)},
        "class_names": names,
        "confusion_matrix": cm.astype(int).tolist(),
    }


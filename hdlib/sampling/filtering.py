"""Selective filtering of synthetic images (HistoDiffusion, stage 6).

Features come from the baseline classifier trained on the real labeled fraction.
One centroid per class from the real features; a synthetic image is kept when

1. its nearest centroid is its target class            (else "wrong_centroid"),
2. the baseline's confidence in the target class >= tau (else "low_confidence"),
3. optionally, it is not a near copy of a real training image: its nearest real
   training feature is at least `delta` away            (else "near_copy"),
4. it is among the first `quota` of its class in the `selection` order (else "over_quota").

Each item gets the first reason that applies, in that order. A quota larger than
the number of candidates left after steps 1-3 keeps all of them.

Selection (`selection_order`), among the candidates of a class that passed steps 1-3:
  closest  the paper's: closest to the class centroid first (ties: candidate order);
  random   a seeded random order: candidate k of class c gets the key
           default_rng([seed, c]).random()[k], so its place depends only on (seed, c, k),
           never on which or how many other candidates there are;
  diverse  greedy farthest-point order in the filter's feature space (L2-normalised when
           normalize=True): first the one closest to the centroid, then repeatedly the one
           farthest (euclidean) from all chosen so far (ties: candidate order). Greedy for
           the first `quota` picks only (cost O(quota x n x D) per class); the candidates
           past the quota follow by their distance to the chosen set, farthest first.

`FeatureFilter` is the rule as an object (a baseline image classifier, the real labeled
features and labels, tau and a per-class near-copy threshold), saved and read back with
safetensors + JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..errors import DataError
from ..evaluation.downstream import build_classifier, extract_features, predict
from ..evaluation.metrics import as_features
from ..io import atomic_write_json

REASONS = ("kept", "wrong_centroid", "low_confidence", "near_copy", "over_quota")
SELECTIONS = ("closest", "random", "diverse")


@dataclass
class FilterResult:
    keep: np.ndarray          # bool [N]: selected for training
    rank: np.ndarray          # int [N]: place in the `selection` order (0 = first choice; closest: the
                              #          closest to its class centroid) among the items that passed
                              #          steps 1-3 of its class; -1 for items rejected before ranking
    reason: np.ndarray        # str [N]: one of REASONS
    distance: np.ndarray      # float [N]: distance to the centroid of its target class
    nearest_class: np.ndarray  # int [N]: class of the nearest centroid
    summary: pd.DataFrame     # per class: candidates, kept and the count per rejection reason
    nn_distance: np.ndarray | None = None  # float [N]: distance to the nearest real training image
    nn_index: np.ndarray | None = None     # int [N]: which training image that is
    near_copy: np.ndarray | None = None    # bool [N]: nn_distance < delta of its class (any candidate)


def _labels(x, name: str, n: int, num_classes: int) -> np.ndarray:
    a = np.asarray(x).reshape(-1)
    if len(a) != n:
        raise DataError(f"{name} has {len(a)} entries but its features have {n} rows")
    if len(a) and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.equal(np.mod(a, 1), 0)):
            raise DataError(f"{name} must hold integer class ids")
    a = a.astype(np.int64)
    bad = a[(a < 0) | (a >= num_classes)]
    if len(bad):
        raise DataError(f"{name} has unknown class id {int(bad[0])} (num_classes={num_classes})")
    return a


def _l2_normalise(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norm, 1e-12)


def _pairwise_distance(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        a_n, b_n = _l2_normalise(a), _l2_normalise(b)
        return 1.0 - a_n @ b_n.T
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _nearest(a: np.ndarray, b: np.ndarray, metric: str, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(distance to, index of) the nearest row of b for each row of a."""
    d, i = [], []
    for k in range(0, len(a), chunk):
        m = _pairwise_distance(a[k:k + chunk], b, metric)
        i.append(m.argmin(1))
        d.append(m[np.arange(len(m)), i[-1]])
    return (np.concatenate(d), np.concatenate(i)) if d else (np.empty(0), np.empty(0, dtype=np.int64))


def _per_class_quota(quota, quota_ratio, real_counts: np.ndarray, num_classes: int) -> np.ndarray:
    """Max number kept per class; a huge number means 'no limit'."""
    unlimited = np.iinfo(np.int64).max
    if quota is not None and quota_ratio is not None:
        raise ValueError("give quota or quota_ratio, not both")
    if quota_ratio is not None:
        if quota_ratio < 0:
            raise ValueError(f"quota_ratio must be >= 0, got {quota_ratio}")
        return np.floor(quota_ratio * real_counts + 1e-9).astype(np.int64)
    if quota is None:
        return np.full(num_classes, unlimited, dtype=np.int64)
    if isinstance(quota, Mapping):
        unknown = [k for k in quota if not 0 <= int(k) < num_classes]
        if unknown:
            raise DataError(f"quota names unknown class id {unknown[0]} (num_classes={num_classes})")
        q = np.full(num_classes, unlimited, dtype=np.int64)  # classes not in the dict are unlimited
        for k, v in quota.items():
            if int(v) < 0:
                raise ValueError(f"quota for class {k} must be >= 0, got {v}")
            q[int(k)] = int(v)
        return q
    if int(quota) < 0:
        raise ValueError(f"quota must be >= 0, got {quota}")
    return np.full(num_classes, int(quota), dtype=np.int64)


def check_selection(selection: str) -> str:
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r} (one of {', '.join(SELECTIONS)})")
    return selection


def random_keys(seed: int, label: int, index) -> np.ndarray:
    """A uniform [0, 1) key per candidate of class `label`: candidate k gets
    default_rng([seed, label]).random(k + 1)[k] (the stream is prefix-stable), whatever the others."""
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    if len(index) == 0:
        return np.empty(0)
    if int(seed) < 0 or int(index.min()) < 0:
        raise ValueError(f"random selection needs a seed and candidate indices >= 0, got seed {seed}")
    return np.random.default_rng([int(seed), int(label)]).random(int(index.max()) + 1)[index]


def _farthest_point_order(features: np.ndarray, first: int, index: np.ndarray, limit: int) -> np.ndarray:
    """Greedy farthest-point order from `first` for `limit` picks; the rest follow by their
    distance to the chosen set, farthest first. Ties: the lower candidate index."""
    n = len(features)
    chosen = np.zeros(n, dtype=bool)
    order = [first]
    chosen[first] = True
    nearest_sq = ((features - features[first]) ** 2).sum(1)  # squared distance to the chosen set
    for _ in range(min(limit, n) - 1):
        gap = np.where(chosen, -np.inf, nearest_sq)
        ties = np.flatnonzero(gap == gap.max())
        j = int(ties[np.argmin(index[ties])])
        order.append(j)
        chosen[j] = True
        nearest_sq = np.minimum(nearest_sq, ((features - features[j]) ** 2).sum(1))
    rest = np.flatnonzero(~chosen)
    rest = rest[np.lexsort((index[rest], -nearest_sq[rest]))]
    return np.concatenate([np.asarray(order, dtype=np.int64), rest]).astype(np.int64)


def selection_order(distance, selection: str = "closest", *, index=None, features=None, label: int = 0,
                    seed: int = 0, limit: int | None = None) -> np.ndarray:
    """The order (positions into the inputs, first choice first) of one class's accepted
    candidates. distance [n]: to the class centroid; index [n]: candidate ids (default
    0..n-1, the tie-breaker and the random key); features [n, D]: diverse only, in the space
    the distances were measured in. limit: diverse picks greedily only this many (the quota;
    the rest follow by distance to the chosen set, farthest first); None = all."""
    check_selection(selection)
    distance = np.asarray(distance, dtype=np.float64).reshape(-1)
    n = len(distance)
    index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64).reshape(-1)
    if len(index) != n:
        raise DataError(f"selection_order: {len(index)} candidate ids for {n} distances")
    if n == 0:
        return np.empty(0, dtype=np.int64)
    closest = np.lexsort((index, distance))  # by distance, ties by candidate id
    if selection == "closest":
        return closest
    if selection == "random":
        return np.lexsort((index, random_keys(seed, label, index)))
    if features is None:
        raise DataError("the diverse selection needs the candidates' features")
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) != n:
        raise DataError(f"selection_order: features of shape {f.shape} for {n} candidates")
    return _farthest_point_order(f, int(closest[0]), index, n if limit is None else max(int(limit), 1))


def filter_synthetic(real_features, real_labels, syn_features, syn_labels, syn_confidence, *, num_classes: int,
                     tau: float = 0.0, quota: int | Mapping[int, int] | None = None, quota_ratio: float | None = None,
                     train_features=None, delta: float | None = None, normalize: bool = True,
                     near_copy_metric: str = "euclidean", class_names: Sequence[str] | None = None,
                     selection: str = "closest", seed: int = 0) -> FilterResult:
    """Centroid rule + confidence threshold + near-copy check + per-class quota.

    real_features [M, D], real_labels [M]: the real labeled images (every class needs >= 1).
    syn_features [N, D], syn_labels [N] (target classes), syn_confidence [N] (baseline
    probability of the target class). quota: one count for every class, or {class: count}
    (classes left out are unlimited); quota_ratio: quota = floor(ratio x real count of the
    class). train_features + delta: near-copy check against real training features
    (euclidean or cosine distance, on L2-normalised features when normalize=True); delta is
    one number or one per class (`calibrate_delta`). selection: which of the candidates that
    pass steps 1-3 come first (module docstring); seed: the random selection's seed. A
    candidate's id (random key, tie-breaker) is its position among its class's rows."""
    check_selection(selection)
    real, real_y, syn, syn_y, conf, train, names = _checked_inputs(
        real_features, real_labels, syn_features, syn_labels, syn_confidence, train_features, delta, num_classes,
        near_copy_metric, class_names)
    real_counts = np.bincount(real_y, minlength=num_classes)
    quotas = _per_class_quota(quota, quota_ratio, real_counts, num_classes)
    if normalize:
        real, syn = _l2_normalise(real), _l2_normalise(syn)
        train = _l2_normalise(train) if train is not None else None
    centroids = np.stack([real[real_y == c].mean(0) for c in range(num_classes)])
    to_centroids = _pairwise_distance(syn, centroids, "euclidean")
    nearest = to_centroids.argmin(1)
    distance = to_centroids[np.arange(len(syn)), syn_y]

    reason = np.full(len(syn), "kept", dtype=object)
    reason[nearest != syn_y] = "wrong_centroid"
    reason[(reason == "kept") & (conf < tau)] = "low_confidence"
    nn_distance = nn_index = near_copy = None
    if train is not None:
        deltas = np.broadcast_to(np.asarray(delta, dtype=np.float64), (num_classes,)) if np.ndim(delta) == 0 \
            else np.asarray(delta, dtype=np.float64)
        if deltas.shape != (num_classes,):
            raise DataError(f"delta needs one value or one per class ({num_classes}), got shape {deltas.shape}")
        nn_distance, nn_index = _nearest(syn, train, near_copy_metric)
        near_copy = nn_distance < deltas[syn_y]
        reason[(reason == "kept") & near_copy] = "near_copy"

    rank = np.full(len(syn), -1, dtype=np.int64)
    for c in range(num_classes):
        idx = np.flatnonzero((reason == "kept") & (syn_y == c))
        ids = np.flatnonzero(syn_y == c).searchsorted(idx)  # position among the class's candidates
        order = idx[selection_order(distance[idx], selection, index=ids, features=syn[idx], label=c, seed=seed,
                                    limit=min(int(quotas[c]), len(idx)))]
        rank[order] = np.arange(len(order))
        reason[order[quotas[c]:]] = "over_quota"
    keep = reason == "kept"
    return FilterResult(keep=keep, rank=rank, reason=reason.astype(str), distance=distance, nearest_class=nearest,
                        summary=_summary(names, real_counts, syn_y, keep, reason), nn_distance=nn_distance,
                        nn_index=nn_index, near_copy=near_copy)


def _checked_inputs(real_features, real_labels, syn_features, syn_labels, syn_confidence, train_features, delta,
                    num_classes: int, near_copy_metric: str, class_names):
    """filter_synthetic's inputs as arrays, each checked with a one-line error naming it:
    (real, real labels, candidates, their labels, their confidence, training features or None, class names)."""
    real = as_features(real_features, "real_features")
    syn = as_features(syn_features, "syn_features")
    if len(syn) == 0:
        raise DataError("no synthetic candidates to filter (syn_features is empty)")
    if real.shape[1] != syn.shape[1]:
        raise DataError(f"real_features have {real.shape[1]} dims but syn_features have {syn.shape[1]}")
    real_y = _labels(real_labels, "real_labels", len(real), num_classes)
    syn_y = _labels(syn_labels, "syn_labels", len(syn), num_classes)
    conf = np.asarray(syn_confidence, dtype=np.float64).reshape(-1)
    if len(conf) != len(syn):
        raise DataError(f"syn_confidence has {len(conf)} entries but syn_features have {len(syn)} rows")
    if near_copy_metric not in ("euclidean", "cosine"):
        raise ValueError(f"unknown near_copy_metric {near_copy_metric!r} (euclidean, cosine)")
    if (train_features is None) != (delta is None):
        raise ValueError("the near-copy check needs both train_features and delta")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for num_classes={num_classes}")
    empty = np.flatnonzero(np.bincount(real_y, minlength=num_classes) == 0)
    if len(empty):
        raise DataError(f"class {names[empty[0]]} (id {empty[0]}) has no real image to build a centroid from")
    train = None
    if train_features is not None:
        train = as_features(train_features, "train_features")
        if train.shape[1] != syn.shape[1] or len(train) == 0:
            raise DataError(f"train_features must be non-empty with {syn.shape[1]} dims, got shape {train.shape}")
    return real, real_y, syn, syn_y, conf, train, names


def _summary(names: list, real_counts, syn_y, keep, reason) -> pd.DataFrame:
    """One row per class: real images, candidates, kept, and the candidates each rule dropped."""
    rows = []
    for c, name in enumerate(names):
        in_c = syn_y == c
        row = {"class_id": c, "class_name": name, "real": int(real_counts[c]), "candidates": int(in_c.sum()),
               "kept": int((keep & in_c).sum())}
        row.update({r: int(((reason == r) & in_c).sum()) for r in REASONS[1:]})
        rows.append(row)
    return pd.DataFrame(rows)


def calibrate_delta(train_features, train_labels, val_features, val_labels, num_classes: int,
                    percentile: float = 1.0, normalize: bool = True, metric: str = "euclidean") -> np.ndarray:
    """Near-copy threshold per class from real data: the `percentile` of the distances from
    each real validation image of the class to its nearest real training image. A synthetic
    image closer to a training image than nearly every real image of its class is a copy.
    Per class, because some classes (near-empty background) are alike by nature.
    A class with no validation image gets the median of the other classes' thresholds."""
    train, val = as_features(train_features, "train_features"), as_features(val_features, "val_features")
    _labels(train_labels, "train_labels", len(train), num_classes)  # checked; any class may be nearest
    vy = _labels(val_labels, "val_labels", len(val), num_classes)
    if normalize:
        train, val = _l2_normalise(train), _l2_normalise(val)
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        v = val[vy == c]
        if len(v):
            out[c] = np.percentile(_nearest(v, train, metric)[0], percentile)
    if np.isnan(out).all():
        raise DataError("calibrate_delta: no validation image in any class")
    out[np.isnan(out)] = np.nanmedian(out)
    return out


__all__ = ["filter_synthetic", "calibrate_delta", "selection_order", "random_keys", "check_selection",
           "FilterResult", "REASONS", "SELECTIONS"]


class FeatureFilter:
    """Centroid rule + confidence >= tau + near-copy check, in a baseline classifier's features.
    `selection` / `seed`: how `hdlib.quota.fill_quota` orders the accepted candidates of a class
    when not told otherwise (module docstring); the diverse one needs __call__'s features."""

    def __init__(self, model, real_features: torch.Tensor, real_labels: torch.Tensor, delta, tau: float,
                 classes: Sequence[str], train_index=None, device: str = "cpu", selection: str = "closest",
                 seed: int = 0):
        self.model, self.real_f, self.real_y = model.eval(), real_features.float(), torch.as_tensor(real_labels)
        self.delta = np.broadcast_to(np.asarray(delta, dtype=np.float64), (len(classes),)).copy()
        self.tau, self.classes, self.device = float(tau), list(classes), device
        self.train_idx = np.arange(len(self.real_f)) if train_index is None else np.asarray(train_index)
        self.selection, self.seed = check_selection(selection), int(seed)

    def __call__(self, images, labels, return_features: bool = False):
        """Per-candidate decisions (a frame, one row per image); with return_features also the
        L2-normalised features [N, D] the rule measured distances in: (frame, features)."""
        syn_f = extract_features(self.model, images, batch_size=128, device=self.device)
        probs, _ = predict(self.model, images, batch_size=128, device=self.device)
        labels = torch.as_tensor(labels, dtype=torch.long)
        conf = probs[torch.arange(len(probs)), labels].numpy()
        res = filter_synthetic(self.real_f.numpy(), self.real_y.numpy(), syn_f.numpy(), labels.numpy(), conf,
                               num_classes=len(self.classes), tau=self.tau, train_features=self.real_f.numpy(),
                               delta=self.delta, class_names=self.classes)
        frame = pd.DataFrame({"accepted": res.reason == "kept", "reason": res.reason, "distance": res.distance,
                              "confidence": conf, "nn_distance": res.nn_distance,
                              "nn_train_index": self.train_idx[res.nn_index], "near_copy": res.near_copy})
        return (frame, _l2_normalise(as_features(syn_f.numpy(), "syn_features"))) if return_features else frame

    def save(self, folder: str | Path, backbone: str, image_size: int) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(folder / "classifier.safetensors"))  # handles timm's shared weights
        save_file({"real_features": self.real_f.contiguous(), "real_labels": self.real_y.contiguous(),
                   "delta": torch.from_numpy(self.delta)}, str(folder / "reference.safetensors"))
        extra = {"selection": self.selection, "seed": self.seed} if self.selection != "closest" else {}
        atomic_write_json(folder / "config.json", {"backbone": backbone, "classes": self.classes, "tau": self.tau,
                                                   "image_size": int(image_size), **extra})

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "FeatureFilter":
        folder = Path(folder)
        c = json.loads((folder / "config.json").read_text())
        model = build_classifier(c["backbone"], num_classes=len(c["classes"]), image_size=c["image_size"])
        load_model(model, str(folder / "classifier.safetensors"))
        ref = load_file(str(folder / "reference.safetensors"))
        return cls(model, ref["real_features"], ref["real_labels"], ref["delta"].numpy(), c["tau"], c["classes"],
                   device=device, selection=c.get("selection", "closest"), seed=c.get("seed", 0))

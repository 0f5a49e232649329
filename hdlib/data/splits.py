"""Seeded, stratified index splits: train/validation, nested label fractions,
class-balanced subsamples, and the largest-remainder quotas they share with the pool."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import DataError


def largest_remainder_quotas(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` proportionally to weights (largest remainder, ties to the first)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    quota = np.floor(exact).astype(int)
    for i in sorted(range(len(w)), key=lambda i: -(exact[i] - quota[i]))[:total - quota.sum()]:
        quota[i] += 1
    return quota.tolist()


def _class_name(c, class_names) -> str:
    return repr(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else repr(c)


def _per_class_permutations(labels, seed: int):
    """{class: seeded permutation of its indices}; one generator, classes in sorted order."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    return {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels).tolist()}


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)  # 1e-9: 0.35 * 10 is 3.4999999...


def stratified_split(labels, val_fraction: float, seed: int,
                     class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/val split. Per class n_val = round(val_fraction *
    n_c) clipped to [1, n_c - 1], so every class is in both parts; a class with
    fewer than 2 images is a DataError. Returns sorted (train_idx, val_idx)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perms = _per_class_permutations(labels, seed)
    for c, idx in perms.items():
        if len(idx) < 2:
            raise DataError(f"class {_class_name(c, class_names)} has {len(idx)} image(s); "
                            f"need >= 2 to split off a validation set")
    train, val = [], []
    for idx in perms.values():
        n_val = min(max(_round_half_up(val_fraction * len(idx)), 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def nested_label_fractions(labels, fractions: Sequence[float], seed: int,
                           class_names: Sequence[str] | None = None) -> dict[float, np.ndarray]:
    """Stratified, nested label subsets: per class one seeded permutation, and
    fraction f keeps its first round(f * n_c) indices (round half up), so a
    smaller fraction's subset lies inside every larger one. f = 1.0 is all.
    A fraction that leaves a class with no image is a DataError.
    Returns {fraction: sorted indices}."""
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"label fraction must be in (0, 1], got {f}")
    perms = _per_class_permutations(labels, seed)
    out = {}
    for f in fractions:
        parts = []
        for c, idx in perms.items():
            k = len(idx) if f == 1.0 else _round_half_up(f * len(idx))
            if k == 0:
                raise DataError(f"label fraction {f} leaves class {_class_name(c, class_names)} with no "
                                f"image ({len(idx)} available; needs >= {0.5 / f:.0f})")
            parts.append(idx[:k])
        out[f] = np.sort(np.concatenate(parts))
    return out


def nested_label_order(labels, seed: int) -> np.ndarray:
    """Each item's position in its class's seeded permutation (the same permutation
    `nested_label_fractions` draws with that seed): the item at position i enters every
    subset that keeps more than i images of its class."""
    order = np.zeros(len(np.asarray(labels)), dtype=np.int64)
    for idx in _per_class_permutations(labels, seed).values():
        order[idx] = np.arange(len(idx))
    return order


def labeled_validation_mask(order: np.ndarray, every: int) -> np.ndarray:
    """Validation inside the labeled budget: positions 1, 1 + every, 1 + 2*every, ... of each
    class's nested order. A labeled subset keeping the first k of a class then holds out
    ceil((k - 1) / every) of them for validation (k = 2 -> 1 train + 1 val; k = 8, every 4
    -> 6 + 2), and both parts are nested across label counts."""
    if every < 2:
        raise ValueError(f"labeled validation needs every >= 2, got {every}")
    return (np.asarray(order) % every) == 1


def stratified_subsample(labels, max_count: int, seed: int) -> np.ndarray:
    """At most `max_count` indices keeping class proportions (largest remainder,
    at least one per class). Returns sorted indices (all if already small)."""
    labels = np.asarray(labels)
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if len(labels) <= max_count:
        return np.arange(len(labels))
    perms = _per_class_permutations(labels, seed)
    if max_count < len(perms):
        raise DataError(f"max_count {max_count} is smaller than the number of classes {len(perms)}")
    sizes = [len(idx) for idx in perms.values()]
    quota = [max(1, q) for q in largest_remainder_quotas(max_count, sizes)]
    while sum(quota) > max_count:  # the max(1, .) floors can overshoot: trim the largest
        quota[int(np.argmax(quota))] -= 1
    return np.sort(np.concatenate([idx[:q] for idx, q in zip(perms.values(), quota)]))

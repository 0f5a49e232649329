"""Access to the study's splits and nested label fractions, by manifest."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..data.splits import labeled_validation_mask
from ..data.streaming import ManifestImages, load_into_memory
from ..errors import HDLibError
from ..paths import StudyPaths, frac_tag
from .context import require


def draw_seed(cfg: Config, draw: int) -> int:
    """Seed of label draw `draw`: each downstream seed re-draws the labeled subset."""
    return int(hashlib.sha1(repr((cfg.study.seed, "labels", int(draw))).encode()).hexdigest()[:8], 16)


def first_draw(cfg: Config) -> int:
    """The first label draw (downstream.seeds[0]): the one single-draw figures, choices and defaults use."""
    return int(cfg.downstream.seeds[0])


def smallest_fraction(cfg: Config) -> float:
    """The grid's smallest label fraction: where the ablation generators' sets and stage 06's comparison are."""
    return float(min(cfg.downstream.fractions))


SPLITS = ("target_train", "target_val", "target_test", "pool", "pool_holdout", "target_test_shifted")


def split_images(cfg: Config, split: str, rows=None):
    """A split's images as a streaming dataset (decoded on the fly from its manifest)."""

    if split not in SPLITS:
        raise HDLibError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
    return ManifestImages(require(StudyPaths(cfg).manifest(split), f"manifest {split}"), cfg.data.image_size, rows)


def split_labels(cfg: Config, split: str) -> torch.Tensor:
    df = pd.read_csv(require(StudyPaths(cfg).manifest(split), f"manifest {split}"), usecols=["label"])
    return torch.tensor(pd.to_numeric(df["label"]).fillna(-1).astype(int).to_numpy(), dtype=torch.long)


def split_sources(cfg: Config, split: str) -> list[str]:
    return pd.read_csv(require(StudyPaths(cfg).manifest(split), f"manifest {split}"), usecols=["source"])["source"].tolist()


def load_split_images(cfg: Config, split: str, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of a few rows of a split, in memory (figures, small subsets)."""

    return load_into_memory(split_images(cfg, split, rows), num_workers=cfg.data.num_workers)


def fraction_column(fraction: float, draw: int) -> str:
    return f"{frac_tag(fraction)}_s{int(draw)}"


def order_column(draw: int) -> str:
    return f"order_s{int(draw)}"


def _labeled_rows(cfg: Config, fraction: float, draw: int | None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(the fractions table, training mask, validation mask) of a label draw of a fraction."""
    draw = first_draw(cfg) if draw is None else draw
    df = pd.read_csv(require(StudyPaths(cfg).fractions_csv, "label-fraction manifest"))
    col = fraction_column(fraction, draw)
    if col not in df:
        raise HDLibError(f"label fraction {fraction:g}, draw {draw} is not in {StudyPaths(cfg).fractions_csv} "
                         f"(data.label_fractions x downstream.seeds)")
    labeled = df[col].to_numpy(bool)
    if not cfg.data.labeled_val_every:
        return df, labeled, np.zeros(len(df), bool)
    val = labeled & labeled_validation_mask(df[order_column(draw)].to_numpy(), cfg.data.labeled_val_every)
    return df, labeled & ~val, val


def fraction_indices(cfg: Config, fraction: float, draw: int | None = None) -> np.ndarray:
    """Rows of target_train a label draw `draw` (default: the first downstream seed) of one
    nested label fraction trains on (its labeled validation images excluded)."""
    df, train, _ = _labeled_rows(cfg, fraction, draw)
    return df.loc[train, "train_index"].to_numpy().copy()  # writable, for torch indexing


def labeled_val_indices(cfg: Config, fraction: float, draw: int | None = None) -> np.ndarray:
    """Rows of target_train a label draw of a fraction holds out for validation (inside its
    label budget); empty when `data.labeled_val_every` is 0."""
    df, _, val = _labeled_rows(cfg, fraction, draw)
    return df.loc[val, "train_index"].to_numpy().copy()


def validation_set(cfg: Config, fraction: float, draw: int | None = None) -> tuple:
    """(images, labels, content key) of the validation images a label draw may use for its
    choices: its labeled validation images, or the target_val split when
    `data.labeled_val_every` is 0 (labels outside the budget)."""
    if not cfg.data.labeled_val_every:
        return split_images(cfg, "target_val"), split_labels(cfg, "target_val"), manifest_hash(cfg, "target_val")
    idx = labeled_val_indices(cfg, fraction, draw)
    df = pd.read_csv(require(StudyPaths(cfg).manifest("target_train"), "manifest target_train")).iloc[idx]
    return (split_images(cfg, "target_train", idx), split_labels(cfg, "target_train")[idx],
            hashlib.sha1(df.to_csv(index=False).encode()).hexdigest())


def labels_per_class(cfg: Config, fraction: float, draw: int | None = None) -> dict:
    """{"train": n, "val": n}: labels per class (rounded mean over classes) a fraction's draw uses."""
    K = len(cfg.data.classes)
    n_tr = len(fraction_indices(cfg, fraction, draw)) / K
    n_va = len(labeled_val_indices(cfg, fraction, draw)) / K
    return {"train": int(round(n_tr)), "val": int(round(n_va)), "total": int(round(n_tr + n_va))}


def fraction_labels(cfg: Config, fraction: float, draw: int | None = None) -> torch.Tensor:
    return split_labels(cfg, "target_train")[fraction_indices(cfg, fraction, draw)]


def manifest_hash(cfg: Config, split: str, fraction: float | None = None, draw: int | None = None) -> str:
    """Content key of a labeled subset: sha1 over its manifest rows (file hashes included)."""
    df = pd.read_csv(require(StudyPaths(cfg).manifest(split), f"manifest {split}"))
    if fraction is not None:
        df = df.iloc[fraction_indices(cfg, fraction, draw)]
    return hashlib.sha1(df.to_csv(index=False).encode()).hexdigest()


def has_shifted_cohort(cfg: Config) -> bool:
    """Whether stage 00 wrote a second, shifted test cohort (data.demo.shifted_test_style, data.shifted_test_path)."""
    return StudyPaths(cfg).manifest("target_test_shifted").exists()


def grid_fractions(cfg: Config) -> list[float]:
    """Label fractions the study trains and generates for: the grid's and the ratio sweep's."""
    fr = list(cfg.downstream.fractions)
    if cfg.downstream.ratio_sweep and cfg.downstream.ratio_sweep_fraction not in fr:
        fr.append(cfg.downstream.ratio_sweep_fraction)
    return sorted(fr)


def draws_for(cfg: Config, fraction: float, primary: float | None) -> list[int]:
    """The label draws (seeds) a fraction gets: every seed at the primary fraction, the first
    `downstream.sweep_seeds` elsewhere (all of them when it is 0). Before the primary cell
    is fixed (primary None), every fraction gets the sweep's draws."""
    seeds, n = list(cfg.downstream.seeds), cfg.downstream.sweep_seeds
    if not n or (primary is not None and fraction == primary):
        return seeds
    return seeds[:n]

"""Access to the study's splits and nested label fractions, by manifest."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..data.streaming import ManifestImages, load_into_memory
from ..errors import HDLibError
from ..paths import StudyPaths, frac_tag
from .context import require


def draw_seed(cfg: Config, draw: int) -> int:
    """Seed of label draw `draw`: each downstream seed re-draws the labeled subset."""
    return int(hashlib.sha1(repr((cfg.study.seed, "labels", int(draw))).encode()).hexdigest()[:8], 16)


SPLITS = ("target_train", "target_val", "target_test", "pool", "pool_holdout")


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


def fraction_indices(cfg: Config, fraction: float, draw: int | None = None) -> np.ndarray:
    """Rows of target_train in label draw `draw` (default: the first downstream seed) of one
    nested label fraction."""
    draw = cfg.downstream.seeds[0] if draw is None else draw
    df = pd.read_csv(require(StudyPaths(cfg).fractions_csv, "label-fraction manifest"))
    col = fraction_column(fraction, draw)
    if col not in df:
        raise HDLibError(f"label fraction {fraction:g}, draw {draw} is not in {StudyPaths(cfg).fractions_csv} "
                         f"(data.label_fractions x downstream.seeds)")
    return df.loc[df[col], "train_index"].to_numpy().copy()  # writable, for torch indexing


def fraction_labels(cfg: Config, fraction: float, draw: int | None = None) -> torch.Tensor:
    return split_labels(cfg, "target_train")[fraction_indices(cfg, fraction, draw)]


def manifest_hash(cfg: Config, split: str, fraction: float | None = None, draw: int | None = None) -> str:
    """Content key of a labeled subset: sha1 over its manifest rows (file hashes included)."""
    df = pd.read_csv(require(StudyPaths(cfg).manifest(split), f"manifest {split}"))
    if fraction is not None:
        df = df.iloc[fraction_indices(cfg, fraction, draw)]
    return hashlib.sha1(df.to_csv(index=False).encode()).hexdigest()


def grid_fractions(cfg: Config) -> list[float]:
    """Label fractions the study trains and generates for: the grid's and the ratio sweep's."""
    fr = list(cfg.downstream.fractions)
    if cfg.downstream.ratio_sweep and cfg.downstream.ratio_sweep_fraction not in fr:
        fr.append(cfg.downstream.ratio_sweep_fraction)
    return sorted(fr)

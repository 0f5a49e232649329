"""Tiling of large images / slides: Otsu's threshold, the tissue mask and
`tile_large_image`, which keeps the tiles that are mostly tissue."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DataError
from .pixels import read_image
from .records import ImageRecord

log = logging.getLogger(__name__)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a histogram."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)                        # pixels at or below each cut
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[1:][int(np.argmax(between))])


def tissue_mask(rgb: np.ndarray, min_saturation: float = 0.05) -> np.ndarray:
    """Tissue where HSV saturation exceeds Otsu's threshold (floored at
    `min_saturation`, so a blank image is not split into 'tissue' noise)."""
    rgb = rgb.astype(np.float32) / 255.0
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = (mx - mn) / np.maximum(mx, 1e-6)
    return saturation > max(otsu_threshold(saturation), min_saturation)


def tile_large_image(path, tile_size: int, stride: int | None = None, tissue_threshold: float = 0.5,
                     max_tiles: int | None = None, source: str | None = None,
                     seed: int = 0) -> list[ImageRecord]:
    """Tile a large image / slide (.svs/.tif via tifffile at level 0, .png/.jpg via
    PIL) into `tile_size` squares every `stride` pixels, keeping tiles whose
    tissue fraction (Otsu on saturation, on a thumbnail) is >= tissue_threshold.
    More than `max_tiles` kept tiles: a seeded random subset (in grid order).
    Returns unlabeled records keyed "tile:x,y,size".
    """
    path = Path(path)
    stride = stride or tile_size
    if tile_size < 1 or stride < 1:
        raise ValueError(f"tile_size and stride must be >= 1, got {tile_size}, {stride}")
    if not 0.0 <= tissue_threshold <= 1.0:
        raise ValueError(f"tissue_threshold must be in [0, 1], got {tissue_threshold}")
    if not path.is_file():
        raise DataError(f"image file does not exist: {path}")
    try:
        image = read_image(path)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e})".splitlines()[0]) from None
    h, w = image.shape[:2]
    if h < tile_size or w < tile_size:
        raise DataError(f"{path} is {w}x{h}, smaller than tile_size {tile_size}")
    # Thumbnail: every d-th pixel, keeping >= ~16 thumbnail pixels per tile side.
    d = max(1, min(tile_size // 16, max(h, w) // 2048))
    mask = tissue_mask(image[::d, ::d])
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    kept = []
    for y in range(0, h - tile_size + 1, stride):
        for x in range(0, w - tile_size + 1, stride):
            y0, x0 = y // d, x // d
            y1, x1 = max(y0 + 1, -(-(y + tile_size) // d)), max(x0 + 1, -(-(x + tile_size) // d))
            y1, x1 = min(y1, mask.shape[0]), min(x1, mask.shape[1])
            inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
            if inside / ((y1 - y0) * (x1 - x0)) >= tissue_threshold:
                kept.append((x, y))
    if max_tiles is not None and len(kept) > max_tiles:
        chosen = np.random.default_rng(seed).choice(len(kept), size=max_tiles, replace=False)
        kept = [kept[i] for i in sorted(chosen)]
    if not kept:
        log.warning("%s: no tile reaches tissue fraction %.2f", path, tissue_threshold)
    source = source or path.stem
    return [ImageRecord(str(path), None, source, f"tile:{x},{y},{tile_size}") for x, y in kept]

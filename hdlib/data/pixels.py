"""Pixel reading: decoding a record to H,W,3 uint8 (whole files, npz rows, tiles;
slide tiles region by region), square resizing, and `load_images`, which turns
records into a uint8 tensor N x 3 x S x S."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch
import zarr
from PIL import Image
from tqdm import tqdm

from ..errors import DataError
from .records import ImageRecord

_TIFF_EXTENSIONS = (".tif", ".tiff", ".svs")


def _to_uint8_rgb(arr: np.ndarray, where: str) -> np.ndarray:
    """H,W / H,W,C / C,H,W of any common dtype -> H,W,3 uint8."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C,H,W) pages
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"{where}: unsupported image shape {arr.shape}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(arr)) <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    else:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    c = arr.shape[-1]
    if c in (1, 2):  # gray / gray+alpha
        arr = np.repeat(arr[..., :1], 3, axis=-1)
    elif c == 4:  # RGBA: alpha dropped (as PIL's convert("RGB") does)
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def _read_tiff(path: Path) -> np.ndarray:
    """Level 0 of the largest series (slides) / largest page of a TIFF / SVS."""
    with tifffile.TiffFile(path) as tif:
        candidates = [s.levels[0] for s in tif.series] or list(tif.pages)
        best = max(candidates, key=lambda s: _pixel_count(s.shape))
        return best.asarray()


def _pixel_count(shape) -> int:
    dims = sorted(shape, reverse=True)[:2]  # the two largest axes are Y and X
    return int(np.prod(dims)) if dims else 0


def read_image(path) -> np.ndarray:
    """Decode a whole image file to H,W,3 uint8 (TIFF/SVS via tifffile, others via PIL)."""
    path = Path(path)
    if path.suffix.lower() in _TIFF_EXTENSIONS:
        arr = _read_tiff(path)
    else:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))  # a writable copy
    return _to_uint8_rgb(arr, str(path))


class LRU:
    """Tiny least-recently-used cache, so a slide is decoded once for all its tiles."""

    def __init__(self, size: int):
        self.size, self.items = max(1, size), OrderedDict()

    def get(self, key, make):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def _parse_tile_key(key: str) -> tuple[int, int, int]:
    x, y, size = (int(v) for v in key[len("tile:"):].split(","))
    return x, y, size


def decode_record(rec: ImageRecord, cache: LRU) -> np.ndarray:
    """Pixels (H,W,3 uint8) of one record; raises on anything unreadable."""
    if not rec.key:
        return read_image(rec.path)
    if rec.key.startswith("npz:"):
        _, split, index = rec.key.split(":")

        def load_split():
            with np.load(rec.path, allow_pickle=False) as npz:
                return np.asarray(npz[f"{split}_images"])
        return _to_uint8_rgb(cache.get(("npz", rec.path, split), load_split)[int(index)], rec.record_id)
    if rec.key.startswith("tile:"):
        x, y, size = _parse_tile_key(rec.key)
        image = cache.get(("image", rec.path), lambda: read_image(rec.path))
        h, w = image.shape[:2]
        if x < 0 or y < 0 or x + size > w or y + size > h:
            raise ValueError(f"tile {x},{y},{size} outside the {w}x{h} image")
        return image[y:y + size, x:x + size]
    raise ValueError(f"unknown record key {rec.key!r}")


def resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square (no aspect distortion), then resize: area filter
    when shrinking, bicubic when enlarging."""
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    arr = arr[top:top + side, left:left + side]
    if side == size:
        return arr
    resample = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(arr).resize((size, size), resample=resample))


def load_images(records: Sequence[ImageRecord], size: int, max_bad_fraction: float = 0.0,
                progress: bool = True, cache_size: int = 2
                ) -> tuple[torch.Tensor, list[ImageRecord], list[tuple[ImageRecord, str]]]:
    """Decode `records` into a uint8 tensor N,3,size,size.

    Unreadable images are skipped and returned in `bad` as (record, reason);
    if more than `max_bad_fraction` of the records are bad a DataError is
    raised as soon as that is certain. `cache_size` large images / npz splits
    stay decoded (records of one slide should be contiguous).
    Returns (images, kept_records, bad).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    n = len(records)
    allowed_bad = math.floor(max_bad_fraction * n + 1e-9)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    ok = torch.zeros(n, dtype=torch.bool)
    bad: list[tuple[int, str]] = []
    cache = LRU(cache_size)
    # Decode grouped by file (a shuffled pool would otherwise re-decode slides), store in input order.
    order = sorted(range(n), key=lambda i: records[i].path)
    for i in tqdm(order, desc="load images", disable=not progress, leave=False):
        rec = records[i]
        try:
            pixels = resize_square(decode_record(rec, cache), size)
        except Exception as e:  # any decoder failure means "this image is unreadable"
            bad.append((i, f"{type(e).__name__}: {e}".splitlines()[0]))
            if len(bad) > allowed_bad:
                first, why = min(bad)
                raise DataError(f"{len(bad)} of {n} images unreadable (more than max_bad_fraction="
                                f"{max_bad_fraction}); first: {records[first].record_id} ({why})") from None
            continue
        out[i] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        ok[i] = True
    if not bad:
        return out, list(records), []
    bad.sort()
    warnings.warn(f"skipped {len(bad)} of {n} unreadable images; first: {records[bad[0][0]].record_id} "
                  f"({bad[0][1]})", stacklevel=2)
    kept = [rec for rec, good in zip(records, ok.tolist()) if good]
    return out[ok], kept, [(records[i], why) for i, why in bad]


def is_slide_tile(rec: ImageRecord) -> bool:
    """A tile of a TIFF/SVS/NDPI slide: read region by region (`decode_tile_lazily`)."""
    return rec.key.startswith("tile:") and Path(rec.path).suffix.lower() in (".tif", ".tiff", ".svs", ".ndpi")


def decode_tile_lazily(rec: ImageRecord) -> np.ndarray:
    """Only the tile's region of level 0 of a (pyramidal, tiled) TIFF/SVS."""
    x, y, size = _parse_tile_key(rec.key)
    with tifffile.TiffFile(rec.path) as tif:
        series = max(tif.series, key=lambda s: int(np.prod(sorted(s.levels[0].shape, reverse=True)[:2])))
        z = zarr.open(series.aszarr(level=0), mode="r")
        h, w = z.shape[:2] if z.shape[-1] in (3, 4) else z.shape[-2:]
        if x < 0 or y < 0 or x + size > w or y + size > h:
            raise ValueError(f"tile {x},{y},{size} outside the {w}x{h} image")
        region = np.asarray(z[y:y + size, x:x + size] if z.shape[-1] in (3, 4) else z[..., y:y + size, x:x + size])
    if region.ndim == 3 and region.shape[0] in (3, 4) and region.shape[-1] not in (3, 4):
        region = np.moveaxis(region, 0, -1)
    return _to_uint8_rgb(region, rec.record_id)

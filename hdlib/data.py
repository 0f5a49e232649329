"""Data layer: image records, loaders for the real formats, image reading,
the unlabeled pre-training pool, splits and manifests.

An `ImageRecord` addresses one image without decoding it: a whole file
(key ""), row i of a MedMNIST-style array ("npz:{split}:{i}") or a tile of a
large image / slide ("tile:{x},{y},{size}", source pixels at level 0).
`load_images` turns records into a uint8 tensor N x 3 x S x S.

Content hashes (used to keep the labeled target out of the pool):
  * whole files: sha1 of the file bytes (`file_sha1`);
  * sub-images: sha1 of "<file sha1>|<key>" (`record_content_hash`), i.e. the
    same row / tile of a byte-identical file, whatever the file is called.
    Decoded pixels are not hashed (that would mean decoding every pool image);
    a re-encoded copy of a target image is therefore not caught.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import DataError
from .io import atomic_write_csv

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_TIFF_EXTENSIONS = (".tif", ".tiff", ".svs")
MANIFEST_COLUMNS = ("path", "key", "label", "class_name", "source", "sha1")


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ImageRecord:
    """One image: a whole file (key "") or a sub-image of it (npz row / tile)."""

    path: str
    label: int | None
    source: str
    key: str = ""

    @property
    def record_id(self) -> str:
        """Unique id of the image: the path, plus the key for sub-images."""
        return f"{self.path}::{self.key}" if self.key else self.path


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Image files under `folder` (recursive), hidden files/folders skipped, sorted."""
    exts = tuple(e.lower() for e in extensions)
    files = [p for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in exts and not _is_hidden(p, folder)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


# --------------------------------------------------------------------------- loaders
def scan_class_folders(root, classes: Sequence[str] | None = None,
                       extensions: Sequence[str] = IMAGE_EXTENSIONS,
                       source: str | None = None) -> tuple[list[ImageRecord], list[str]]:
    """One sub-folder per class (e.g. NCT-CRC-HE-100K). Returns (records, classes).

    With `classes` given, those folders must exist (label = index in `classes`)
    and other folders are ignored; without it every non-hidden sub-folder is a
    class, in sorted order.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder does not exist: {root}")
    source = source or root.name
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"no class folders (and so no images) in {root}")
    else:
        classes = list(classes)
        if len(set(classes)) != len(classes):
            raise DataError(f"duplicate class names in {classes} for {root}")
        for name in classes:
            if not (root / name).is_dir():
                raise DataError(f"missing class folder {root / name} (class {name!r})")
        extra = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and p.name not in classes)
        if extra:
            log.warning("%s: ignoring folders that are not classes: %s", root, ", ".join(extra))
    records = []
    for label, name in enumerate(classes):
        files = _image_files(root / name, extensions)
        if not files:
            raise DataError(f"class {name!r} has no images ({', '.join(extensions)}) in {root / name}")
        records += [ImageRecord(str(f), label, source) for f in files]
    return records, list(classes)


def scan_unlabeled_folder(root, source: str | None = None,
                          extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[ImageRecord]:
    """Every image under `root` (recursive, sorted), unlabeled."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder does not exist: {root}")
    files = _image_files(root, extensions)
    if not files:
        raise DataError(f"no images ({', '.join(extensions)}) under {root}")
    return [ImageRecord(str(f), None, source or root.name) for f in files]


def _npy_header(zf: zipfile.ZipFile, key: str):
    """(shape, dtype) of array `key` inside an .npz, read from its header only."""
    with zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def load_npz_dataset(path, split: str, class_names: Sequence[str] | None = None,
                     source: str | None = None) -> tuple[list[ImageRecord], list[str]]:
    """MedMNIST-style .npz ({split}_images N,H,W[,3] uint8; {split}_labels N[,1]).

    Returns (records keyed "npz:{split}:{i}", classes). Class names default to
    "0".."K-1" with K = max label + 1; PathMNIST's order is hdlib.CRC_CLASSES.
    The image array is checked from its header, not loaded.
    """
    path = Path(path)
    img_key, lab_key = f"{split}_images", f"{split}_labels"
    if not path.is_file():
        raise DataError(f"npz file does not exist: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            for key in (img_key, lab_key):
                if key not in names:
                    raise DataError(f"{path}: missing key {key!r} (has {sorted(names)})")
            shape, dtype = _npy_header(zf, img_key)
        with np.load(path, allow_pickle=False) as npz:
            labels = np.asarray(npz[lab_key])
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if dtype != np.uint8 or not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
        raise DataError(f"{path}: {img_key!r} must be uint8 N,H,W or N,H,W,3; got {dtype} {shape}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != shape[0]:
        raise DataError(f"{path}: {lab_key!r} must be N or N,1 with N={shape[0]}; got {labels.shape}")
    if shape[0] == 0:
        raise DataError(f"{path}: {img_key!r} is empty")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"{path}: {lab_key!r} must hold non-negative integers")
    n_classes = int(labels.max()) + 1
    classes = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    if n_classes > len(classes):
        raise DataError(f"{path}: {lab_key!r} has label {n_classes - 1} but only {len(classes)} class names")
    source = source or path.stem
    records = [ImageRecord(str(path), int(lab), source, f"npz:{split}:{i}") for i, lab in enumerate(labels)]
    return records, classes


# --------------------------------------------------------------------------- pixel reading
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
    import tifffile

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
        from PIL import Image

        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))  # a writable copy
    return _to_uint8_rgb(arr, str(path))


class _LRU:
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


def _decode_record(rec: ImageRecord, cache: _LRU) -> np.ndarray:
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


def _resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square (no aspect distortion), then resize: area filter
    when shrinking, bicubic when enlarging."""
    from PIL import Image

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
    cache = _LRU(cache_size)
    # Decode grouped by file (a shuffled pool would otherwise re-decode slides), store in input order.
    order = sorted(range(n), key=lambda i: records[i].path)
    for i in tqdm(order, desc="load images", disable=not progress, leave=False):
        rec = records[i]
        try:
            pixels = _resize_square(_decode_record(rec, cache), size)
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


# --------------------------------------------------------------------------- tiling
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


# --------------------------------------------------------------------------- hashing
_SHA1_CACHE: dict[tuple, str] = {}


def file_sha1(path) -> str:
    """sha1 of the file's bytes; cached per (path, size, mtime, inode) so a changed
    file is hashed again."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise DataError(f"file does not exist: {path}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA1_CACHE:
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA1_CACHE[key] = digest.hexdigest()
    return _SHA1_CACHE[key]


def record_content_hash(rec: ImageRecord) -> str:
    """File sha1 for whole files; sha1("<file sha1>|<key>") for sub-images."""
    h = file_sha1(rec.path)
    return h if not rec.key else hashlib.sha1(f"{h}|{rec.key}".encode()).hexdigest()


# --------------------------------------------------------------------------- pool
@dataclass(frozen=True)
class PoolSource:
    """One unlabeled source of the pre-training pool and its share weight."""

    name: str
    records: Sequence[ImageRecord]
    weight: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "records", tuple(self.records))
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"pool source {self.name!r}: weight must be >= 0, got {self.weight}")


def _quotas(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` proportionally to weights (largest remainder, ties to the first)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    quota = np.floor(exact).astype(int)
    for i in sorted(range(len(w)), key=lambda i: -(exact[i] - quota[i]))[:total - quota.sum()]:
        quota[i] += 1
    return quota.tolist()


def _target_overlap_index(target_records: Sequence[ImageRecord], progress: bool):
    exact, whole_files, tiled_files, any_file = {}, {}, {}, {}
    for rec in tqdm(target_records, desc="hash target", disable=not progress, leave=False):
        h = file_sha1(rec.path)
        exact.setdefault(record_content_hash(rec), rec)
        any_file.setdefault(h, rec)
        if not rec.key:
            whole_files.setdefault(h, rec)
        elif rec.key.startswith("tile:"):
            tiled_files.setdefault(h, rec)
    return exact, whole_files, tiled_files, any_file


def build_pool(sources: Sequence[PoolSource], target_records: Sequence[ImageRecord], total: int,
               seed: int, progress: bool = True) -> tuple[list[ImageRecord], dict]:
    """Draw `total` unlabeled records, each source's share proportional to its weight.

    Within a source: without replacement; if the source is smaller than its
    share, every record once and the rest drawn with replacement (flagged in
    the summary). Before drawing, every candidate record is compared with the
    labeled target by content hash (see module doc); a match is a DataError.
    Besides identical content, a pool image also overlaps the target if it is
    a sub-image of a file the target uses whole, a whole file the target takes
    sub-images from, or a tile of a slide the target takes tiles from.
    Returns (records in a seeded random order, summary dict).
    """
    if not isinstance(total, (int, np.integer)) or total < 1:
        raise ValueError(f"pool total must be a positive integer, got {total!r}")
    if not sources:
        raise ValueError("build_pool needs at least one PoolSource")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"pool source names must be unique, got {names}")
    if sum(s.weight for s in sources) <= 0:
        raise ValueError(f"pool source weights sum to 0: {names}")
    for s in sources:
        if s.weight > 0 and not s.records:
            raise DataError(f"pool source {s.name!r} has no images")
    # Leakage check first: the labeled target must never be in the pool.
    exact, whole_files, tiled_files, any_file = _target_overlap_index(target_records, progress)
    n_candidates = sum(len(s.records) for s in sources)
    bar = tqdm(total=n_candidates, desc="hash pool", disable=not progress, leave=False)
    for s in sources:
        for rec in s.records:
            h = file_sha1(rec.path)
            hit = (exact.get(record_content_hash(rec)) or whole_files.get(h)
                   or (any_file.get(h) if not rec.key else None)
                   or (tiled_files.get(h) if rec.key.startswith("tile:") else None))
            if hit is not None:
                bar.close()
                raise DataError(f"pool source {s.name!r} image {rec.record_id} is target image "
                                f"{hit.record_id} (source {hit.source!r}) by content hash")
            bar.update()
    bar.close()
    quotas = _quotas(total, [s.weight for s in sources])
    children = np.random.SeedSequence(seed).spawn(len(sources) + 1)
    pool, summary = [], {"total": total, "seed": seed, "sources": {}}
    for s, quota, child in zip(sources, quotas, children):
        rng = np.random.default_rng(child)
        n = len(s.records)
        if quota <= n:
            idx = rng.choice(n, size=quota, replace=False) if quota else np.empty(0, dtype=int)
        else:
            idx = np.concatenate([rng.permutation(n), rng.integers(0, n, size=quota - n)])
            log.warning("pool source %r has %d images for a share of %d: drawing with replacement",
                        s.name, n, quota)
        pool += [s.records[i] for i in idx]
        summary["sources"][s.name] = {"weight": s.weight, "available": n, "drawn": int(quota),
                                      "unique": int(min(quota, n)), "with_replacement": quota > n}
    order = np.random.default_rng(children[-1]).permutation(len(pool))
    return [pool[i] for i in order], summary


# --------------------------------------------------------------------------- splits
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
    quota = [max(1, q) for q in _quotas(max_count, sizes)]
    while sum(quota) > max_count:  # the max(1, .) floors can overshoot: trim the largest
        quota[int(np.argmax(quota))] -= 1
    return np.sort(np.concatenate([idx[:q] for idx, q in zip(perms.values(), quota)]))


# --------------------------------------------------------------------------- manifests
def write_manifest(records: Sequence[ImageRecord], path, classes: Sequence[str] | None = None,
                   extra_columns: Mapping[str, Sequence] | None = None, progress: bool = True) -> None:
    """CSV (path, key, label, class_name, source, sha1 [+ extra columns]) written
    atomically; sha1 is of the file's bytes, so a later change to a file can be detected."""
    import pandas as pd

    extra = dict(extra_columns or {})
    for name, values in extra.items():
        if name in MANIFEST_COLUMNS:
            raise ValueError(f"extra column {name!r} clashes with a manifest column")
        if len(values) != len(records):
            raise ValueError(f"extra column {name!r} has {len(values)} values for {len(records)} records")
    rows = []
    for rec in tqdm(records, desc="hash manifest", disable=not progress, leave=False):
        name = ""
        if rec.label is not None and classes is not None:
            if not 0 <= rec.label < len(classes):
                raise DataError(f"{rec.record_id}: label {rec.label} is not one of {len(classes)} classes")
            name = classes[rec.label]
        rows.append({"path": rec.path, "key": rec.key, "label": rec.label, "class_name": name,
                     "source": rec.source, "sha1": file_sha1(rec.path)})
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    frame["label"] = frame["label"].astype("Int64")
    for name, values in extra.items():
        frame[name] = list(values)
    atomic_write_csv(frame, path)

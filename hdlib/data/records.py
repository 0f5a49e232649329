"""Image records and the loaders of the real formats: class folders, unlabeled
folders and MedMNIST-style .npz arrays.

An `ImageRecord` addresses one image without decoding it: a whole file
(key ""), row i of a MedMNIST-style array ("npz:{split}:{i}") or a tile of a
large image / slide ("tile:{x},{y},{size}", source pixels at level 0).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


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

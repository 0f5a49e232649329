"""Streaming images: no stage holds a whole dataset in memory.

- `ManifestImages`: a `torch.utils.data.Dataset` over a manifest's rows (the manifests
  are the index): each item is decoded, tile-cropped (slides: only the tile's region
  is read, through tifffile + zarr) and resized when asked for.
- `StreamingSource`: what the Trainer reads from a per-item dataset: the rows of each
  step's batch, fetched by a DataLoader with workers, in the plan's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..errors import DataError
from .manifests import records_from_manifest
from .pixels import LRU, decode_record, decode_tile_lazily, is_slide_tile, resize_square
from .records import ImageRecord


class ManifestImages(torch.utils.data.Dataset):
    """Images of manifest rows, decoded on the fly: item i -> (uint8 [3, size, size], label or -1).

    `rows` picks a subset (in that order). A worker keeps the last few decoded whole
    images (npz splits, small PNG/JPEG sources of tiles) in an LRU cache; tiles of
    TIFF/SVS slides are read region by region, never the whole slide."""

    def __init__(self, records: Sequence[ImageRecord] | str | Path | pd.DataFrame, size: int,
                 rows: Sequence[int] | None = None, cache_size: int = 4):
        self.records = records if isinstance(records, (list, tuple)) else records_from_manifest(records)
        self.rows = np.arange(len(self.records)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.size, self.cache_size = int(size), int(cache_size)
        self._cache = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([-1 if self.records[r].label is None else self.records[r].label for r in self.rows],
                            dtype=torch.long)

    def subset(self, rows: Sequence[int]) -> "ManifestImages":
        return ManifestImages(self.records, self.size, self.rows[np.asarray(rows, dtype=np.int64)], self.cache_size)

    def record(self, i: int) -> ImageRecord:
        return self.records[int(self.rows[i])]

    def __getitem__(self, i: int):
        if self._cache is None:  # created in each worker process
            self._cache = LRU(self.cache_size)
        rec = self.record(i)
        try:
            pixels = decode_tile_lazily(rec) if is_slide_tile(rec) else decode_record(rec, self._cache)
            pixels = resize_square(pixels, self.size)
        except Exception as e:  # noqa: BLE001 - one line naming the file
            raise DataError(f"{rec.record_id}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
        label = -1 if rec.label is None else rec.label
        return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1), label  # writable copy


def loader(dataset, batch_size: int = 64, num_workers: int = 0, batch_sampler=None, progress: bool = False,
           desc: str = "images"):
    """A DataLoader over `dataset` in order (or over `batch_sampler`'s index lists), with a
    progress bar in the terminal when asked."""
    kw = dict(num_workers=num_workers, persistent_workers=False)
    if num_workers:
        kw["prefetch_factor"] = 2
    dl = (torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kw) if batch_sampler is not None
          else torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kw))
    return tqdm(dl, desc=desc, disable=not progress, leave=False)


def load_into_memory(dataset, num_workers: int = 0, batch_size: int = 64, progress: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of a SMALL dataset (a labeled fraction, a figure's examples)."""
    xs, ys = [], []
    for x, y in loader(dataset, batch_size, num_workers, progress=progress):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        return torch.empty(0, 3, getattr(dataset, "size", 0), getattr(dataset, "size", 0), dtype=torch.uint8), \
            torch.empty(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys)


def scan_readable(records: Sequence[ImageRecord], size: int, num_workers: int = 0, progress: bool = False
                  ) -> list[tuple[ImageRecord, str]]:
    """Decode every record once, keeping nothing: the (record, reason) pairs that fail."""
    ds = _Probe(ManifestImages(list(records), size))
    bad = []
    for idx, errors in loader(ds, 256, num_workers, progress=progress, desc="check images"):
        bad += [(records[int(i)], e) for i, e in zip(idx, errors) if e]
    return bad


class _Probe(torch.utils.data.Dataset):
    def __init__(self, ds: ManifestImages):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            self.ds[i]
            return i, ""
        except DataError as e:
            return i, str(e).split(": unreadable ", 1)[-1]


class StreamingSource:
    """A per-item dataset as the Trainer reads it: `batches(index_lists)` yields the
    collated items of each list, in order, fetched by a DataLoader with `num_workers`."""

    def __init__(self, dataset, num_workers: int = 0, transform=None):
        self.dataset, self.num_workers, self.transform = dataset, int(num_workers), transform

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, index_lists: Iterable[list[int]]):
        for batch in loader(self.dataset, batch_sampler=_Lists(index_lists), num_workers=self.num_workers):
            yield self.transform(batch) if self.transform else tuple(batch)


class _Lists:
    """A batch sampler over a (possibly lazy) iterable of index lists."""

    def __init__(self, lists):
        self.lists = lists

    def __iter__(self):
        return iter(self.lists)

"""Streaming data: images decoded from disk on the fly, latents read lazily from
memory-mapped arrays. No stage holds a whole dataset in memory.

- `ManifestImages`: a `torch.utils.data.Dataset` over a manifest's rows (the manifests
  are the index): each item is decoded, tile-cropped (slides: only the tile's region
  is read, through tifffile + zarr) and resized when asked for.
- `StreamingSource`: what the Trainer reads from a per-item dataset: the rows of each
  step's batch, fetched by a DataLoader with workers, in the plan's order.
- `LatentStore`: the latent cache of a study: per split, the posterior mean and
  standard deviation as float16 memory-mapped .npy files, written once in a streaming
  pass (`LatentWriter`, shardable across processes) and read lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .data import ImageRecord, _decode_record, _LRU, _resize_square
from .errors import DataError


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------

def records_from_manifest(manifest: str | Path | pd.DataFrame) -> list[ImageRecord]:
    df = pd.read_csv(manifest, keep_default_na=False) if not isinstance(manifest, pd.DataFrame) else manifest
    labels = pd.to_numeric(df["label"], errors="coerce") if "label" in df else pd.Series([np.nan] * len(df))
    keys = df["key"].fillna("") if "key" in df else [""] * len(df)
    return [ImageRecord(str(p), None if pd.isna(lb) else int(lb), str(src), str(k))
            for p, lb, src, k in zip(df["path"], labels, df.get("source", [""] * len(df)), keys)]


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
            self._cache = _LRU(self.cache_size)
        rec = self.record(i)
        try:
            pixels = _decode_tile_lazily(rec) if _is_slide_tile(rec) else _decode_record(rec, self._cache)
            pixels = _resize_square(pixels, self.size)
        except Exception as e:  # noqa: BLE001 - one line naming the file
            raise DataError(f"{rec.record_id}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
        label = -1 if rec.label is None else rec.label
        return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1), label  # writable copy


def _is_slide_tile(rec: ImageRecord) -> bool:
    return rec.key.startswith("tile:") and Path(rec.path).suffix.lower() in (".tif", ".tiff", ".svs", ".ndpi")


def _decode_tile_lazily(rec: ImageRecord) -> np.ndarray:
    """Only the tile's region of level 0 of a (pyramidal, tiled) TIFF/SVS."""
    import tifffile
    import zarr

    from .data import _parse_tile_key, _to_uint8_rgb

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


def loader(dataset, batch_size: int = 64, num_workers: int = 0, batch_sampler=None, progress: bool = False,
           desc: str = "images"):
    """A DataLoader over `dataset` in order (or over `batch_sampler`'s index lists), with a
    progress bar in the terminal when asked."""
    from tqdm.auto import tqdm

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


# ---------------------------------------------------------------------------
# latents
# ---------------------------------------------------------------------------

LATENT_DTYPE = np.float16  # half the disk; far below the latents' own noise (std ~1 after scaling)


class LatentStore:
    """A study's latent cache: <root>/<split>.mean.npy, <split>.std.npy (float16, N x C x H x W,
    memory-mapped), <split>.labels.npy and latents.json (scale, shape, counts).

    The posterior mean AND standard deviation are stored: a stored sample would bake one
    fixed noise draw into every epoch. Training draws z0 = mean + std * eps with a fresh,
    per-sample seeded eps (`sample`); classification and statistics use the mean."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta = self.root / "latents.json"
        if not meta.exists():
            raise DataError(f"{meta}: no latent cache here (run stage 01 first)")
        self.meta = json.loads(meta.read_text())
        self.scale = float(self.meta["scale"])
        self.shape = tuple(self.meta["shape"])

    def splits(self) -> list[str]:
        return list(self.meta["counts"])

    def __len__(self):
        return sum(self.meta["counts"].values())

    def mean(self, split: str) -> np.ndarray:
        """Scaled posterior means, memory-mapped (N, C, H, W)."""
        return np.load(self.root / f"{split}.mean.npy", mmap_mode="r")

    def std(self, split: str) -> np.ndarray:
        return np.load(self.root / f"{split}.std.npy", mmap_mode="r")

    def labels(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.load(self.root / f"{split}.labels.npy"))

    def means(self, split: str, rows=None) -> torch.Tensor:
        """Float32 means of some rows (all when None), in memory: for small sets only."""
        m = self.mean(split)
        if rows is None:
            return torch.from_numpy(np.asarray(m, dtype=np.float32))
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *m.shape[1:]), dtype=np.float32)
        out[order] = m[rows[order]]  # memory maps read fastest in file order
        return torch.from_numpy(out)

    def source(self, split: str, rows=None, labels: bool = False) -> "LatentSource":
        return LatentSource(self, split, rows, labels)


class LatentSource:
    """Trainer dataset over a split's latents: `source[idx]` -> (mean, std[, label]) as float32
    tensors, read from the memory maps (only the rows asked for)."""

    def __init__(self, store: LatentStore, split: str, rows=None, labels: bool = False):
        self.mean_map, self.std_map = store.mean(split), store.std(split)
        self.rows = np.arange(len(self.mean_map)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.label_values = store.labels(split)[torch.from_numpy(self.rows)] if labels else None
        if len(self.rows) == 0:
            raise DataError(f"latent split {split!r}: no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: torch.Tensor):
        r = self.rows[np.asarray(idx)]
        order = np.argsort(r, kind="stable")  # memory maps read fastest in file order
        back = np.argsort(order, kind="stable")
        mean = torch.from_numpy(np.asarray(self.mean_map[r[order]], dtype=np.float32)[back])
        std = torch.from_numpy(np.asarray(self.std_map[r[order]], dtype=np.float32)[back])
        if self.label_values is None:
            return mean, std
        return mean, std, self.label_values[torch.as_tensor(idx)]


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor, salt: int = 104_729
                     ) -> torch.Tensor:
    """z0 = mean + std * eps, eps from a generator per sample (seed + salt): the same
    sample whatever the batch split."""
    eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(
        (int(s) + salt) % 2**63)) for s in seeds]).to(mean.device, mean.dtype)
    return mean + std * eps


class LatentWriter:
    """Writes one split's latents into preallocated .npy files, shard by shard: process `rank`
    of `world` writes rows shard(n, rank, world); `finish` (rank 0, after all shards) renames
    them into place. Each write maps the file only for that write: a map kept open for the whole
    split would keep every written page counted in the process's memory (it grows with N)."""

    def __init__(self, root: str | Path, split: str, n: int, shape: Sequence[int], create: bool):
        self.root, self.split, self.n = Path(root), split, int(n)
        self.root.mkdir(parents=True, exist_ok=True)
        self.paths = {k: self.root / f"{split}.{k}.npy.part" for k in ("mean", "std")}
        if create:
            for path in self.paths.values():
                np.lib.format.open_memmap(path, mode="w+", dtype=LATENT_DTYPE, shape=(self.n, *shape)).flush()

    def _map(self, kind: str) -> np.ndarray:
        return np.load(self.paths[kind], mmap_mode="r+")

    def write(self, rows: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> None:
        for kind, values in (("mean", mean), ("std", std)):
            m = self._map(kind)
            m[rows] = values.float().cpu().numpy().astype(LATENT_DTYPE)
            m.flush()
            del m

    def scale(self, factor: float, chunk: int = 4096) -> None:
        """Multiply every stored value by `factor`, chunk by chunk (memory stays flat)."""
        for kind in ("mean", "std"):
            for i in range(0, self.n, chunk):
                m = self._map(kind)
                m[i:i + chunk] = (np.asarray(m[i:i + chunk], dtype=np.float32) * factor).astype(LATENT_DTYPE)
                m.flush()
                del m

    def finish(self, labels: np.ndarray) -> None:
        """Rename the parts into place (atomic per file) and save the labels."""
        import os

        from .io import atomic_path

        with atomic_path(self.root / f"{self.split}.labels.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(labels, dtype=np.int64))
        for kind, path in self.paths.items():
            os.replace(path, self.root / f"{self.split}.{kind}.npy")

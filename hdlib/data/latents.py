"""The latent cache of a study: per split, the posterior mean and standard deviation
as float16 memory-mapped .npy files, written once in a streaming pass (`LatentWriter`,
shardable across processes) and read lazily (`LatentStore`, `LatentSource`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import DataError
from ..io import atomic_path

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

    def source(self, split: str, rows=None, labels: bool = False, label_values=None) -> "LatentSource":
        return LatentSource(self, split, rows, labels, label_values)


class LatentSource:
    """Trainer dataset over a split's latents: `source[idx]` -> (mean, std[, label]) as float32
    tensors, read from the memory maps (only the rows asked for)."""

    def __init__(self, store: LatentStore, split: str, rows=None, labels: bool = False, label_values=None):
        self.mean_map, self.std_map = store.mean(split), store.std(split)
        self.rows = np.arange(len(self.mean_map)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.label_values = store.labels(split)[torch.from_numpy(self.rows)] if labels else None
        if label_values is not None:  # labels from elsewhere (pseudo-labels), one per row
            if len(label_values) != len(self.rows):
                raise DataError(f"latent split {split!r}: {len(label_values)} label values for {len(self.rows)} rows")
            self.label_values = torch.as_tensor(np.asarray(label_values), dtype=torch.long)
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
        with atomic_path(self.root / f"{self.split}.labels.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(labels, dtype=np.int64))
        for kind, path in self.paths.items():
            os.replace(path, self.root / f"{self.split}.{kind}.npy")

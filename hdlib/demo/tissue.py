"""Procedural 9-class tissue named after the CRC classes: one painter per class draws
hematoxylin / eosin / neutral density maps, rendered to RGB through a stain style."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from .. import CRC_CLASSES
from ..errors import ConfigError, DataError
from .canvas import (
    Canvas,
    jittered_points,
    noise,
    pixel_grid,
    saturate,
    smoothstep,
    stamp,
)
from .stain import STAIN_STYLES, apply_stain

# Bump when the renderer changes, so cached demo folders are rebuilt.
GENERATOR_VERSION = 1

CONFUSABLE: dict[str, tuple[str, ...]] = {
    "ADI": ("BACK", "MUC", "STR"), "BACK": ("ADI", "MUC", "DEB"), "DEB": ("LYM", "TUM", "MUC"),
    "LYM": ("DEB", "TUM", "STR"), "MUC": ("STR", "BACK", "DEB"), "MUS": ("STR", "TUM", "NORM"),
    "NORM": ("TUM", "STR", "LYM"), "STR": ("MUS", "MUC", "ADI"), "TUM": ("NORM", "DEB", "LYM")}


def _nuclei_round(cv: Canvas, rng, spacing, radius, dark, keep=1.0, irregular=0.04, elong=1.1, jitter=0.45):
    y, x = jittered_points(rng, cv.size, spacing * cv.k, jitter, keep)
    n = y.size
    rad = radius * cv.k * rng.uniform(0.85, 1.15, n)
    el = rng.uniform(1.0, elong, n)
    return stamp(cv.size, y, x, rad * el, rad / np.sqrt(el), rng.uniform(0, np.pi, n),
                  dark * rng.uniform(0.85, 1.15, n), irregular, rng=rng)


def _draw_adi(cv: Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    sy, sx = jittered_points(rng, S, rng.uniform(70, 110) * k, 0.3)
    yy, xx = pixel_grid(S)
    amp = 5 * k
    wy, wx = noise(rng, S, 30 * k) * amp, noise(rng, S, 30 * k) * amp
    d2 = (yy[..., None] + wy[..., None] - sy) ** 2 + (xx[..., None] + wx[..., None] - sx) ** 2
    two = np.sqrt(np.partition(d2, 1, axis=-1)[..., :2])
    gap = np.abs(two[..., 1] - two[..., 0])
    width = max(1.6 * k, 0.7)
    membrane = np.exp(-(gap / width) ** 2)
    # Torn / collapsed membranes (more with difficulty) make fat look like background.
    intact = smoothstep((noise(rng, S, 25 * k) + 1.6 - 2.2 * mix * rng.random()) / 0.8)
    membrane *= intact
    cv.e += membrane * rng.uniform(0.55, 0.85)
    cv.h += membrane * 0.06
    # A few flattened nuclei pressed against the membranes (midpoints of neighbour seeds).
    i = rng.integers(0, sy.size, 4)
    j = np.array([np.argsort((sy - sy[t]) ** 2 + (sx - sx[t]) ** 2)[1] for t in i])
    my, mx = (sy[i] + sy[j]) / 2, (sx[i] + sx[j]) / 2
    th = np.arctan2(sy[j] - sy[i], sx[j] - sx[i]) + np.pi / 2
    keep = rng.random(4) < 0.6
    cv.h += stamp(S, my[keep], mx[keep], 6 * k, 1.6 * k, th[keep], 1.0, rng=rng)


def _draw_back(cv: Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    cv.n += np.clip(rng.uniform(0.0, 0.25) + 0.04 * noise(rng, S, 60 * k), 0, None)  # grey glass / focus
    cv.e += np.clip(0.02 + 0.015 * noise(rng, S, 20 * k), 0, None)
    cv.h += np.clip(0.01 * noise(rng, S, 12 * k), 0, None)
    # Faint dust and specks.
    n = rng.poisson(6)
    cv.n += stamp(S, rng.uniform(0, S, n), rng.uniform(0, S, n), rng.uniform(1, 4, n) * k,
                   rng.uniform(1, 3, n) * k, rng.uniform(0, np.pi, n), rng.uniform(0.05, 0.3, n), 0.2, rng=rng)
    # With difficulty: ghost membranes of torn fat / a sliver of tissue at the edge.
    if rng.random() < 0.4 * mix:
        ghost = Canvas(S, cv.k)
        _draw_adi(ghost, rng, 1.0)
        f = rng.uniform(0.15, 0.5)
        cv.e += f * ghost.e
        cv.h += f * ghost.h


def _draw_deb(cv: Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    patch = noise(rng, S, 35 * k)
    cv.e += np.clip(0.55 + 0.17 * patch + 0.08 * noise(rng, S, 6 * k), 0.1, None)  # necrotic eosin smudge
    cv.h += np.clip(0.22 + 0.15 * noise(rng, S, 18 * k), 0, None)  # purple haze of nuclear dust
    cv.n += np.clip(0.08 * noise(rng, S, 40 * k) + 0.05, 0, None)
    # Karyorrhectic fragments: many small irregular dark bits, clustered where the patch noise is high.
    n = int(rng.integers(90, 200) * (S / (224 * k)) ** 2 + 1)
    y, x = rng.uniform(0, S, n), rng.uniform(0, S, n)
    frag = stamp(S, y, x, rng.uniform(1.2, 3.5, n) * k, rng.uniform(0.8, 2.2, n) * k, rng.uniform(0, np.pi, n),
                  rng.uniform(0.6, 1.6, n), 0.3, rng=rng)
    # Some intact pyknotic nuclei (more with difficulty: looks like lymphocytes).
    intact = _nuclei_round(cv, rng, 22 - 8 * mix, 4.5, 1.5, keep=0.25 + 0.5 * mix, irregular=0.12)
    cv.h += saturate(frag + intact, 2.0)


def _draw_lym(cv: Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    cv.e += np.clip(0.18 + 0.08 * noise(rng, S, 20 * k) + 0.35 * mix * rng.random() * (noise(rng, S, 30 * k) > 0.3),
                    0, None)
    cv.h += 0.08
    spacing = rng.uniform(10.5, 13.5)
    nuc = _nuclei_round(cv, rng, spacing, rng.uniform(4.3, 5.4), rng.uniform(1.4, 1.9), keep=rng.uniform(0.8, 0.97),
                        irregular=0.04 + 0.15 * mix)
    cv.h += saturate(nuc, 2.2)


def _draw_muc(cv: Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    th = rng.uniform(0, np.pi)
    warp = (noise(rng, S, 40 * k) * 12 * k, noise(rng, S, 40 * k) * 12 * k)
    wisps = noise(rng, S, 3.5 * k, th, 8.0, warp)
    body = noise(rng, S, 45 * k)
    lake = smoothstep((body + 1.2) / 1.5)  # mucin lake with some empty cracks
    cv.h += lake * (0.12 + 0.22 * np.clip(wisps, 0, None) * rng.uniform(0.6, 1.2))
    cv.e += lake * (0.06 + 0.05 * np.clip(wisps, 0, None)) + 0.25 * mix * rng.random() * np.clip(body, 0, None)
    n = rng.poisson(3)  # a few floating cells
    cv.h += stamp(S, rng.uniform(0, S, n), rng.uniform(0, S, n), 4.5 * k, 3.5 * k, rng.uniform(0, np.pi, n),
                   1.0, 0.1, rng=rng)


def _fibres(cv: Canvas, rng, theta, coherence, period, wave):
    """Streaky fibre texture along theta; low coherence and high wave give loose, curly collagen."""
    k, S = cv.k, cv.size
    warp = (noise(rng, S, 50 * k) * wave * k, noise(rng, S, 50 * k) * wave * k)
    return noise(rng, S, period * k, theta, 3 + 12 * coherence, warp)


def _draw_mus(cv: Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    th = rng.uniform(0, np.pi)
    coh = 1.0 - 0.7 * mix * rng.random()
    fib = _fibres(cv, rng, th, coh, 2.5, 4 + 14 * (1 - coh))
    gaps = smoothstep((_fibres(cv, rng, th, coh, 10, 6) + 1.9 - 0.8 * (1 - coh)) / 0.7)  # clefts between bundles
    cv.e += gaps * np.clip(0.95 + 0.22 * fib, 0.2, None) * rng.uniform(0.85, 1.1)
    cv.h += gaps * 0.07
    n = int(rng.integers(14, 30) * (S / (224 * k)) ** 2 + 1)
    y, x = rng.uniform(0, S, n), rng.uniform(0, S, n)
    spread = 0.08 + 0.5 * (1 - coh)
    cv.h += stamp(S, y, x, rng.uniform(8, 13, n) * k, rng.uniform(1.8, 2.6, n) * k, th + rng.normal(0, spread, n),
                   rng.uniform(0.9, 1.4, n), 0.03, rng=rng)


def _draw_str(cv: Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    th = rng.uniform(0, np.pi)
    coh = 0.25 + 0.6 * mix * rng.random()
    fib = _fibres(cv, rng, th, coh, 3.0, 22 - 12 * coh)
    loose = smoothstep((_fibres(cv, rng, th, coh, 8, 20) + 0.3 + 1.4 * coh) / 1.2)
    cv.e += loose * np.clip(0.55 + 0.35 * fib, 0.05, None) * rng.uniform(0.7, 1.05) + 0.05
    cv.h += 0.04
    n = int(rng.integers(6, 14) * (S / (224 * k)) ** 2 + 1)
    y, x = rng.uniform(0, S, n), rng.uniform(0, S, n)
    cv.h += stamp(S, y, x, rng.uniform(7, 12, n) * k, rng.uniform(1.1, 1.7, n) * k, th + rng.normal(0, 0.5, n),
                   rng.uniform(0.9, 1.4, n), 0.05, rng=rng)
    m = rng.poisson(3)  # stray lymphocytes
    cv.h += stamp(S, rng.uniform(0, S, m), rng.uniform(0, S, m), 4.5 * k, 4.5 * k, 0.0, 1.5, 0.03, rng=rng)


def _glands(cv: Canvas, rng, n_glands, crowd, atypia, lumen_dirt=0.0):
    """Crypts: lumen, epithelial ring with a row of nuclei; returns the epithelium+lumen mask."""
    k, S = cv.k, cv.size
    yy, xx = pixel_grid(S)
    rho = np.full((S, S), 9.0, np.float32)
    nuc = np.zeros((S, S), np.float32)
    warp = (noise(rng, S, 40 * k) * 6 * k * (1 + 2 * atypia), noise(rng, S, 40 * k) * 6 * k * (1 + 2 * atypia))
    for _ in range(n_glands):
        cy, cx = rng.uniform(-0.1, 1.1, 2) * S
        r1 = rng.uniform(40, 65) * k
        r2 = r1 * rng.choice([rng.uniform(1.0, 1.4), rng.uniform(2.0, 3.0)])
        th = rng.uniform(0, np.pi)
        c, s = np.cos(th), np.sin(th)
        dy, dx = yy + warp[0] - cy, xx + warp[1] - cx
        u, v = (dx * c + dy * s) / r2, (-dx * s + dy * c) / r1
        rho = np.minimum(rho, np.sqrt(u * u + v * v))
        # Basal row of nuclei around the ring, elongated perpendicular to it.
        perim = np.pi * (r1 + r2)
        m = int(perim / ((7.5 - 2.5 * crowd) * k)) + 1
        phi = np.sort(rng.uniform(0, 2 * np.pi, m)) if atypia > 0.5 else \
            np.linspace(0, 2 * np.pi, m, endpoint=False) + rng.normal(0, 0.02 * (1 + 6 * atypia), m)
        rr = 0.84 + rng.normal(0, 0.02 + 0.12 * atypia, m)
        lu, lv = rr * np.cos(phi) * r2, rr * np.sin(phi) * r1
        ny, nx = cy + lu * s + lv * c, cx + lu * c - lv * s
        nth = np.arctan2(ny - cy, nx - cx)
        size = rng.uniform(1.0, 1.0 + 0.8 * atypia, m)
        nuc += stamp(S, ny - warp[0][np.clip(ny.astype(int), 0, S - 1), np.clip(nx.astype(int), 0, S - 1)],
                      nx - warp[1][np.clip(ny.astype(int), 0, S - 1), np.clip(nx.astype(int), 0, S - 1)],
                      5.5 * k * size, 2.3 * k * size, nth, rng.uniform(1.0, 1.3 + 0.6 * atypia, m),
                      0.03 + 0.2 * atypia, rng=rng)
    lumen = smoothstep((0.58 - rho) / 0.08)
    epi = smoothstep((1.0 - rho) / 0.06) * (1 - lumen)
    return lumen, epi, nuc


def _draw_norm(cv: Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    atypia = 0.6 * mix * rng.random()
    lumen, epi, nuc = _glands(cv, rng, int(rng.integers(2, 4)), crowd=atypia, atypia=atypia)
    stroma = 1 - _np_clip01(lumen + epi)
    goblet = smoothstep((noise(rng, S, 5 * k) - 0.6) / 0.5) * epi * (1 - atypia)  # pale mucin cups
    cv.e += epi * (0.42 - 0.3 * goblet) + stroma * np.clip(0.45 + 0.15 * noise(rng, S, 12 * k), 0.1, None)
    cv.h += epi * (0.12 + 0.15 * goblet) + lumen * 0.04
    lam = _nuclei_round(cv, rng, 16, 4.3, 1.5, keep=0.2) * stroma  # lamina propria lymphocytes/plasma cells
    cv.h += saturate(nuc * (1 - lumen) + lam, 2.0)


def _np_clip01(x):
    return np.clip(x, 0, 1)


def _draw_tum(cv: Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    cv.e += np.clip(0.38 + 0.12 * noise(rng, S, 15 * k), 0.1, None)  # amphophilic cytoplasm
    cv.h += 0.16
    regular = 0.7 * mix * rng.random()  # at difficulty: tidier nuclei, gland-forming
    spacing = rng.uniform(13, 17) * (1 + 0.25 * regular)
    y, x = jittered_points(rng, S, spacing * k, 0.4, rng.uniform(0.8, 0.95))
    n = y.size
    b = rng.uniform(4.0, 8.0, n) * k * (1 - 0.3 * regular)
    a = b * rng.uniform(1.1, 1.8, n)
    nuc = stamp(S, y, x, a, b, rng.uniform(0, np.pi, n), rng.uniform(0.8, 1.7, n), 0.18 * (1 - regular) + 0.03,
                 vesicular=rng.uniform(0, 0.55, n) * (1 - regular), rng=rng)
    # Prominent nucleoli in some nuclei.
    sel = rng.random(n) < 0.3 * (1 - regular)
    nuc += stamp(S, y[sel], x[sel], 1.3 * k, 1.3 * k, 0.0, 0.8, rng=rng)
    if rng.random() < 0.3 + 0.6 * regular:  # irregular gland lumen with dirty necrosis
        lumen, epi, gnuc = _glands(cv, rng, 1, crowd=1.0, atypia=1.0 - 0.6 * regular)
        nuc = nuc * (1 - lumen)
        cv.e = cv.e * (1 - lumen) + lumen * 0.25 * np.clip(noise(rng, S, 8 * k) + 0.5, 0, None)
        cv.h = cv.h * (1 - lumen)
    cv.h += saturate(nuc, 2.3)


_DRAW: dict[str, Callable] = {"ADI": _draw_adi, "BACK": _draw_back, "DEB": _draw_deb, "LYM": _draw_lym,
                              "MUC": _draw_muc, "MUS": _draw_mus, "NORM": _draw_norm, "STR": _draw_str,
                              "TUM": _draw_tum}


def _check_render_args(class_name: str, size: int, style: str, difficulty: float) -> None:
    if class_name not in _DRAW:
        raise DataError(f"unknown tissue class {class_name!r} (known: {', '.join(CRC_CLASSES)})")
    if style not in STAIN_STYLES:
        raise ConfigError(f"unknown stain style {style!r} (known: {', '.join(STAIN_STYLES)})")
    if not (isinstance(difficulty, (int, float)) and 0.0 <= float(difficulty) <= 1.0):
        raise ConfigError(f"difficulty must be a number in [0, 1], got {difficulty!r}")
    if not (isinstance(size, (int, np.integer)) and 8 <= int(size) <= 4096):
        raise ConfigError(f"tile size must be an integer in [8, 4096], got {size!r}")


def render_densities(class_name: str, size: int, rng: np.random.Generator, difficulty: float = 0.5):
    """Hematoxylin, eosin and neutral density maps (float32 HxW) of one tile, before staining."""
    _check_render_args(class_name, size, "classic", difficulty)
    d = float(difficulty)
    # Field of view of a 224-px NCT tile (0.5 um/px), with a magnification jitter.
    k = size / 224.0 * float(np.exp(rng.normal(0, 0.06 + 0.25 * d)))
    cv = Canvas(int(size), k)
    _DRAW[class_name](cv, rng, d)
    # Tissue heterogeneity: part of the tile (smooth blob) comes from the confusable class.
    if d > 0 and rng.random() < min(1.0, 1.2 * d):
        other = Canvas(int(size), k)
        partners = CONFUSABLE[class_name]
        partner = partners[0] if rng.random() < 0.6 else partners[int(rng.integers(1, len(partners)))]
        _DRAW[partner](other, rng, d)
        frac = min(0.55, rng.uniform(0.15, 0.5) * d)
        blob = noise(rng, size, 55 * k)
        t = np.quantile(blob, 1 - frac)
        m = smoothstep((blob - t) / 0.5 + 0.5)
        cv.h, cv.e, cv.n = [(1 - m) * p + m * q for p, q in ((cv.h, other.h), (cv.e, other.e), (cv.n, other.n))]
    # Section thickness: all densities scale together.
    thick = float(np.exp(rng.normal(0, 0.25 * d)))
    cv.h, cv.e = cv.h * thick, cv.e * thick
    # Dihedral orientation (tissue has no up).
    t = int(rng.integers(8))
    maps = [np.rot90(x, t % 4) for x in (cv.h, cv.e, cv.n)]
    if t >= 4:
        maps = [x[:, ::-1] for x in maps]
    return [np.ascontiguousarray(x, dtype=np.float32) for x in maps]


def render_tile(class_name: str, size: int, rng: np.random.Generator, style: str = "classic",
                difficulty: float = 0.5) -> np.ndarray:
    """One size x size H&E-like tile of ``class_name`` in stain ``style`` (uint8 HxWx3).

    ``difficulty`` in [0, 1] widens per-tile variation (stain, scale, blur,
    noise) and mixes in features of the confusable class (CONFUSABLE).
    """
    _check_render_args(class_name, size, style, difficulty)
    d = float(difficulty)
    st = STAIN_STYLES[style]
    h, e, neutral = render_densities(class_name, size, rng, d)
    rgb = apply_stain(h, e, st, rng, jitter=0.35 + 0.65 * d, neutral=neutral)
    sigma = st.blur * size / 224.0 * float(rng.uniform(0.7, 1.3)) + d * float(rng.uniform(0, 0.5)) * size / 64.0
    if sigma > 0.15:
        rgb = ndimage.gaussian_filter(rgb, (sigma, sigma, 0), truncate=3.0)
    rgb += rng.normal(0, st.noise * (1 + d), rgb.shape).astype(np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

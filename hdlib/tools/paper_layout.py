"""A small dataset in the real paper layout, and the overrides of the paper-size dry run.

`write_paper_layout(root, ...)` writes, deterministically and atomically, procedural tissue
(`hdlib.demo.render_tile`) in the folder layout `params/nct_crc.yaml` expects:

    root/NCT-CRC-HE-100K/<ADI BACK DEB LYM MUC MUS NORM STR TUM>/*.tif   224x224 RGB, "target" stain
    root/CRC-VAL-HE-7K/<same classes>/*.tif                              224x224 RGB, "target" stain
    root/pool/tiles/*.tif        unlabeled 224 px tiles in the pool stains (classic, pale, dark)
    root/pool/slides/slide.tif   a pyramidal tiled TIFF (level 0 + a 4x-downsampled level in a
                                 SubIFD, 256 px tiles, zlib), procedural tissue in the "classic" stain
    root/paper_layout.json       the arguments and every file's size (written last)

A build with the same arguments is reused; otherwise the layout is built in a temporary
sibling folder and swapped in with a rename, so `root` is always complete or absent.

`dryrun_overrides(root, results_root)` is the one list of `key=value` overrides with which
`make dryrun` runs `params/nct_crc.yaml` on such a layout on the CPU: model sizes stay the
paper's; only step counts, sample counts, seeds, the grid and the paths change.

    python -m hdlib.tools.paper_layout data/paper_layout --n-train 3 --n-test 1 --n-pool 12
    python -m hdlib.tools.paper_layout data/paper_layout --print-overrides --results-root data/dryrun-results
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import TRAINING_SET_NAMES
from ..data.tiling import tile_large_image
from ..demo import CRC_CLASSES, GENERATOR_VERSION, render_tile, tile_rng
from ..errors import ConfigError, DataError, one_line_errors
from ..io import atomic_dir, build_lock

LAYOUT_VERSION = 1
MARKER = "paper_layout.json"
TRAIN_DIR, TEST_DIR = "NCT-CRC-HE-100K", "CRC-VAL-HE-7K"
TILE_PX = 224                              # NCT-CRC-HE-100K / CRC-VAL-HE-7K tiles
TARGET_STYLE = "target"                    # labeled target: a stain the pool never has
POOL_STYLES = ("classic", "pale", "dark")  # unlabeled pool tiles, cycled
SLIDE_STYLE = "classic"
SLIDE_TILE = 256                           # TIFF tile size = the study's data.tile_size
SLIDE_DOWNSAMPLE = 4
# Dense tissue classes for the slide: the tissue mask (saturation) keeps them; fat and
# background would read as glass.
SLIDE_CLASSES = ("DEB", "LYM", "MUS", "NORM", "STR", "TUM")
DIFFICULTY = 0.5
TISSUE_THRESHOLD = 0.5                     # data.tissue_threshold's default (params/nct_crc.yaml keeps it)


@dataclass(frozen=True)
class PaperLayout:
    """Paths of a built layout and its counts."""

    root: Path
    train: Path
    test: Path
    pool_tiles: Path
    slide: Path
    params: dict

    @property
    def slide_tiles(self) -> int:
        """Tiles of data.tile_size the study keeps from the slide (tissue fraction >= 0.5)."""
        return int(self.params["slide_tiles"])


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"paper layout: {name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _paths(root: Path, params: dict) -> PaperLayout:
    return PaperLayout(root, root / TRAIN_DIR, root / TEST_DIR, root / "pool" / "tiles",
                       root / "pool" / "slides" / "slide.tif", params)


def _intact(root: Path, args: dict) -> dict | None:
    """The marker's params if root holds a complete build with these arguments."""
    try:
        rec = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("args") != args or not isinstance(rec.get("files"), dict):
        return None
    for rel, size in rec["files"].items():
        try:
            if (root / rel).stat().st_size != size:
                return None
        except OSError:
            return None
    return rec


def write_paper_layout(root, n_train_per_class: int, n_test_per_class: int, n_pool: int, seed: int = 0, *,
                       slide_size: int = 1024) -> PaperLayout:
    """Write (or reuse) the layout under `root` (see the module doc); returns its paths.

    Images: train/test tiles in the held-out "target" stain, pool tiles in the other
    stains (classes balanced and shuffled, never written down), one slide of
    `slide_size` x `slide_size` pixels (a multiple of 256 and >= 1024, so the study's
    256 px tiles cover it and the 4x level is tiled too)."""
    root = Path(root)
    args = {"n_train_per_class": _check_int("n_train_per_class", n_train_per_class, 1),
            "n_test_per_class": _check_int("n_test_per_class", n_test_per_class, 1),
            "n_pool": _check_int("n_pool", n_pool, 1), "seed": _check_int("seed", seed, 0),
            "slide_size": _check_int("slide_size", slide_size, SLIDE_TILE * SLIDE_DOWNSAMPLE),
            "layout_version": LAYOUT_VERSION, "generator_version": GENERATOR_VERSION}
    if args["slide_size"] % SLIDE_TILE:
        raise ConfigError(f"paper layout: slide_size must be a multiple of {SLIDE_TILE}, got {slide_size}")
    rec = _intact(root, args)
    if rec is not None:
        return _paths(root, rec["params"])
    with build_lock(root):
        rec = _intact(root, args)  # another process may have built it while we waited
        if rec is not None:
            return _paths(root, rec["params"])
        for stale in [*root.parent.glob(f"{root.name}.tmp-*"), *root.parent.glob(f"{root.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # leftovers of killed builds (our naming only)
        with atomic_dir(root) as tmp:
            files = _write_all(tmp, args)
            params = {**args, "slide_tiles": _count_slide_tiles(tmp / "pool" / "slides" / "slide.tif"),
                      "classes": list(CRC_CLASSES), "target_style": TARGET_STYLE, "pool_styles": list(POOL_STYLES),
                      "slide_style": SLIDE_STYLE}
            (tmp / MARKER).write_text(json.dumps({"args": args, "params": params, "files": files},
                                                 indent=1, sort_keys=True) + "\n")
    return _paths(root, params)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_tif(path: Path, rgb: np.ndarray) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, rgb, photometric="rgb")  # uncompressed RGB, as the NCT tiles


def _write_all(out: Path, args: dict) -> dict[str, int]:
    seed = args["seed"]
    rels = []
    for split, folder, n in (("train", TRAIN_DIR, args["n_train_per_class"]),
                             ("test", TEST_DIR, args["n_test_per_class"])):
        for ci, cls in enumerate(CRC_CLASSES):
            for i in range(n):
                rel = f"{folder}/{cls}/{cls}-{split.upper()}-{i:05d}.tif"
                _write_tif(out / rel, render_tile(cls, TILE_PX, tile_rng(seed, split, ci, i, TARGET_STYLE),
                                                  TARGET_STYLE, DIFFICULTY))
                rels.append(rel)
    labels = np.random.default_rng([seed, 2, 0xB001]).permutation(np.arange(args["n_pool"]) % len(CRC_CLASSES))
    for i, ci in enumerate(labels.tolist()):
        style = POOL_STYLES[i % len(POOL_STYLES)]
        rel = f"pool/tiles/{i:05d}.tif"
        _write_tif(out / rel, render_tile(CRC_CLASSES[ci], TILE_PX, tile_rng(seed, "pool", ci, i, style), style,
                                          DIFFICULTY))
        rels.append(rel)
    rel = "pool/slides/slide.tif"
    _write_slide(out / rel, render_slide(args["slide_size"], seed))
    rels.append(rel)
    return {r: (out / r).stat().st_size for r in rels}


def render_slide(size: int, seed: int = 0) -> np.ndarray:
    """A size x size RGB whole-slide-like image: a disc of tissue (256 px patches of dense
    tissue classes at NCT magnification, blended by a smooth mask) on bright glass."""
    rng = np.random.default_rng([int(seed), 3, zlib.crc32(b"slide")])
    n = size // SLIDE_TILE
    glass = np.array([244.0, 242.0, 245.0], np.float32)
    img = np.empty((size, size, 3), np.float32)
    for gy in range(n):
        for gx in range(n):
            ci = CRC_CLASSES.index(SLIDE_CLASSES[int(rng.integers(len(SLIDE_CLASSES)))])
            patch = render_tile(CRC_CLASSES[ci], SLIDE_TILE, tile_rng(seed, "pool", ci, 100_000 + gy * n + gx,
                                                                      SLIDE_STYLE), SLIDE_STYLE, DIFFICULTY)
            img[gy * SLIDE_TILE:(gy + 1) * SLIDE_TILE, gx * SLIDE_TILE:(gx + 1) * SLIDE_TILE] = patch
    # Tissue: a disc touching the slide's edges (so corner tiles are mostly glass), soft border.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    mask = np.clip((1.0 - r) / 0.04 + 0.5, 0.0, 1.0)[..., None]
    noise = rng.normal(0.0, 1.5, img.shape).astype(np.float32)
    out = mask * img + (1 - mask) * (glass + noise)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _write_slide(path: Path, level0: np.ndarray) -> None:
    """Pyramidal tiled TIFF: level 0, then the downsampled level in a SubIFD (reduced-resolution
    subfile), 256 px tiles, zlib, as tifffile writes OME/SVS-like pyramids."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = level0.shape[:2]
    f = SLIDE_DOWNSAMPLE
    level1 = level0.reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    opts = dict(photometric="rgb", tile=(SLIDE_TILE, SLIDE_TILE), compression="zlib")
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, subifds=1, description="hdlib procedural slide", **opts)
        tif.write(level1, subfiletype=1, **opts)


def _count_slide_tiles(path: Path) -> int:

    return len(tile_large_image(path, SLIDE_TILE, tissue_threshold=TISSUE_THRESHOLD))


def read_layout(root) -> PaperLayout:
    """A layout written earlier (its marker), or a DataError."""
    root = Path(root)
    try:
        rec = json.loads((root / MARKER).read_text())
        return _paths(root, rec["params"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{root}: no paper layout here (run `python -m hdlib.tools.paper_layout {root}` first)") from None


# ---------------------------------------------------------------------------
# the dry run's overrides (the one place they are listed)
# ---------------------------------------------------------------------------

DRYRUN_TRAINING_SETS = [s for s in TRAINING_SET_NAMES if s != "scratch"]


def dryrun_overrides(root, results_root: str = "data/dryrun-results") -> list[str]:
    """`key=value` overrides that run params/nct_crc.yaml on the layout at `root` on the CPU.

    ONLY step counts, batch sizes, sample counts, seeds, the grid (training sets too), paths/devices
    and where the guidance setting comes from (the params, not a sweep on validation) change: every
    model keeps the paper's size (256 px, f=4 autoencoder [128, 256, 512] -> 64x64x3, 192-channel
    U-Net, the yaml's latent classifier, ViT-S/16), and so do learning rates, EMA, schedules, losses,
    the guidance scale, eta, tau and data.max_bad_fraction."""
    lay = read_layout(root)
    hold = 1  # data.pool_holdout: tiles per source kept out of training (autoencoder check)
    # The pool: two equally weighted sources, each drawn without replacement (as the paper's
    # pool is far larger than any source's share would need).
    pool_size = 2 * min(lay.params["n_pool"] - hold, lay.slide_tiles - hold)
    if pool_size < 2:
        raise DataError(f"{root}: too few pool tiles for a dry run ({lay.params['n_pool']} tiles, "
                        f"{lay.slide_tiles} slide tiles; need >= 2 each)")
    sources = (f"[{{name: pool_tiles, kind: folder, path: {lay.pool_tiles}}}, "
               f"{{name: pool_slide, kind: slides, path: {lay.slide}}}]")
    ov = [
        # where and how: the CPU, full precision, one worker, a scratch results folder
        "study.name=nct_crc_dryrun", f"study.results_root={results_root}", "study.device=cpu",
        "study.mixed_precision='no'", "study.workers=1",
        # paths: the layout
        f"data.train_path={lay.train}", f"data.test_path={lay.test}", f"data.pool_sources={sources}",
        # samples: the whole (tiny) pool, one held-out tile per source; label fractions of the grid
        # (data.val_fraction stays 0.1: the split keeps >= 1 validation image per class anyway; all
        # labels of the tiny training split = 2 per class, 1 training + 1 labeled validation image)
        f"data.pool_size={pool_size}", f"data.pool_holdout={hold}", "data.label_fractions=[1.0]",
        # latent classifier: validation latents scored per evaluation
        "latent_classifier.eval_samples=9",
        # stage 02's sample figure and realism table (each sample is a paper-size U-Net chain and decode)
        "diffusion.preview_samples=2", "diffusion.realism_samples=2",
        # sampling: steps and sample counts (guidance scale 10 and eta 1 stay). Every candidate is a
        # paper-size decode (~6 s on a 2-core CPU), so guidance comes from the params instead of a sweep on
        # validation: the sweep's candidates are made and judged like every set's, the adapted denoiser is
        # still trained and sampled (stage 02), and the smoke study runs the choice end to end
        "sampling.select_on_validation=false", "sampling.num_inference_steps=1", "sampling.sweep_per_class=1",
        "sampling.batch_size=4", "sampling.max_candidates_factor=1.0",
        # grid: one seed, one fraction (the ratio sweep at the main ratio adds no cell), every training set
        # but the from-scratch ablation: its U-Net, trainer and guided sampler are those the adapted and
        # the pre-trained denoisers run here, and the smoke study runs it end to end
        "downstream.seeds=[0]", "downstream.fractions=[1.0]", "downstream.ratio_sweep=[1.0]",
        "downstream.ratio_sweep_fraction=1.0",
        f"downstream.training_sets=[{','.join(DRYRUN_TRAINING_SETS)}]",
        "downstream.ratio_sweep_sets=[real,histodiffusion_unfiltered,histodiffusion,classifier_free]",
        # quality: the fewest samples the metrics accept
        "quality.samples_per_class=2", "quality.kid_subset_size=2",
    ]
    # steps: every trained model 2 steps, no warm-up, a checkpoint at the last step (a paper-size denoiser
    # checkpoint with EMA and Adam state is ~3.9 GB on disk, ~2 kept at most); batches of 2, and
    # of 1 for the 256 px autoencoder and the denoisers (a step of batch 2 takes ~60 s and ~20 s here)
    steps = 2
    for model in ("autoencoder.train", "diffusion.pretrain", "diffusion.adapt", "diffusion.scratch",
                  "diffusion.classifier_free", "latent_classifier.train", "downstream.train",
                  "downstream.reference_train"):
        batch = 1 if model.startswith(("autoencoder", "diffusion")) else 2
        # one checkpoint per kind of network: the other denoisers save the same U-Net as pre-training
        every = steps if model not in ("diffusion.adapt", "diffusion.scratch", "diffusion.classifier_free") else 10 * steps
        ov += [f"{model}.max_steps={steps}", f"{model}.batch_size={batch}", f"{model}.warmup_steps=0",
               f"{model}.checkpointing_steps={every}"]
    return ov


@one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hdlib.tools.paper_layout", description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("--n-train", type=int, default=3, help="training tiles per class")
    ap.add_argument("--n-test", type=int, default=1, help="test tiles per class")
    ap.add_argument("--n-pool", type=int, default=12, help="unlabeled pool tiles (besides the slide)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-overrides", action="store_true",
                    help="print the dry run's overrides for an existing layout (shell-quoted, one per line, for eval)")
    ap.add_argument("--results-root", default="data/dryrun-results", help="with --print-overrides")
    a = ap.parse_args(argv)
    if a.print_overrides:
        # one per line, shell-quoted, joined by line continuations: fit for `eval`
        print(" \\\n".join(shlex.quote(o) for o in dryrun_overrides(a.root, a.results_root)))
    else:
        lay = write_paper_layout(a.root, a.n_train, a.n_test, a.n_pool, a.seed)
        print(f"{lay.root}: {a.n_train}+{a.n_test} tiles per class, {a.n_pool} pool tiles, "
              f"slide with {lay.slide_tiles} tissue tiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every file and folder a study reads and writes, and every name used for them.

Layout of results/<study>/ (only small files are committed):
    config.json              resolved parameters (written by every stage's setup)
    manifests/*.csv          exactly which images (with hashes) each split uses
    cache/*.pt               decoded images and latents (not committed)
    models/<name>/           checkpoints, log.csv, final weights (not committed)
    synthetic/<set>/         generated PNGs + manifest.csv + filter.csv (not committed)
    grid/<cell>.json         one downstream grid cell each
    metrics/<stage>.json     numbers each stage produced
    figures/*.png, tables/*  what the report shows
    REPORT.md, provenance.json

Names: one per generator, training set and model, used alike in code, tables,
figures and the report (`GENERATORS`, `TRAINING_SETS`, `model_name`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .config import Config
from .errors import HDLibError

REPO_ROOT = Path(__file__).resolve().parent.parent

# generator -> what it is. The name is the key everywhere (synthetic set names, tables, figures).
GENERATORS = {
    "histodiffusion": "HistoDiffusion: pre-trained LDM + noise-aware latent-classifier guidance",
    "pretrained": "pre-trained LDM, unguided (s = 0)",
    "scratch": "LDM trained from scratch on the labeled fraction + the same guidance",
    "classifier_free": "class-conditional LDM with classifier-free guidance, trained on the labeled fraction",
}
# training set -> what the downstream classifier is trained on (real labeled fraction + ...)
TRAINING_SETS = {
    "real": "real labeled images only",
    "histodiffusion": "real + HistoDiffusion samples, selectively filtered",
    "histodiffusion_unfiltered": "real + HistoDiffusion samples, unfiltered",
    "scratch": "real + from-scratch LDM samples, filtered",
    "classifier_free": "real + classifier-free-guidance samples, filtered",
    "pseudo_label": "real + unlabeled target images pseudo-labeled by the real-only classifier (no generation)",
    "histodiffusion+pseudo_label": "real + the rival's pseudo-labeled images + HistoDiffusion's kept images "
                                   "(generation on top of self-training)",
}
# training sets that add real unlabeled target images rather than generated ones
PSEUDO_LABEL_SETS = ("pseudo_label",)
# training sets that add the images of several others, with the same lambda over all of them
COMBINED_SETS = {"histodiffusion+pseudo_label": ("pseudo_label", "histodiffusion")}


def training_set_generator(training_set: str) -> str | None:
    """The generator whose samples a training set adds (None for real only and pseudo-labels)."""
    if training_set == "real" or training_set in PSEUDO_LABEL_SETS:
        return None
    if training_set in COMBINED_SETS:
        return next(g for g in map(training_set_generator, COMBINED_SETS[training_set]) if g)
    gen = training_set.removesuffix("_unfiltered")
    if gen not in GENERATORS:
        raise HDLibError(f"unknown training set {training_set!r} (known: {', '.join(TRAINING_SETS)})")
    return gen


def is_filtered(training_set: str) -> bool:
    return training_set != "real" and not training_set.endswith("_unfiltered")


def frac_tag(fraction: float) -> str:
    """The one spelling of a label fraction in file names: 0.05 -> 'f0.05'."""
    return f"f{float(fraction):g}"


def model_name(task: str, fraction: float | None = None, adaptation: str | None = None,
               draw: int | None = None) -> str:
    """Folder name under models/ of each trainable model. Models that learn from a labeled
    subset carry its fraction and label draw (`_s<draw>`: each downstream seed re-draws it)."""
    suffix = "" if draw is None else f"_s{int(draw)}"
    if task in ("autoencoder", "denoiser_pretrained", "reference_classifier"):
        return task
    if task == "denoiser_adapted":
        if adaptation == "labeled":
            return f"denoiser_adapted_labeled_{frac_tag(fraction)}{suffix}"
        return f"denoiser_adapted_{adaptation}"
    if task in ("denoiser_scratch", "denoiser_classifier_free", "latent_classifier", "baseline_classifier"):
        if fraction is None:
            raise HDLibError(f"model {task}: a label fraction is required")
        return f"{task}_{frac_tag(fraction)}{suffix}"
    raise HDLibError(f"unknown model {task!r}")


def synthetic_set_name(generator: str, fraction: float, draw: int | None = None, tag: str = "") -> str:
    return f"{generator}_{frac_tag(fraction)}" + ("" if draw is None else f"_s{int(draw)}") + (f"_{tag}" if tag else "")


def task_seed(cfg: Config, *parts) -> int:
    """A distinct, reproducible seed per (study seed, task, fraction ...)."""
    h = hashlib.sha1(repr((cfg.study.seed, *parts)).encode()).hexdigest()
    return int(h[:8], 16)


def request_seed_base(cfg: Config, tag: str) -> int:
    """Image 0's seed of the named sampling request `tag` (image i gets base + i, `seeds_from`)."""
    return task_seed(cfg, "sample", tag) % (2**31)


def seeds_from(base: int, start: int, n: int):
    """Seeds of images start..start+n of a request whose image 0 has seed `base`."""
    import numpy as np

    return (int(base) + start + np.arange(n, dtype=np.int64)) % (2**62)


def request_seeds(cfg: Config, tag: str, n: int):
    """Per-image seeds of a named sampling request: image i of request `tag` always gets
    the same seed, whatever the batch or shard it is generated in."""
    return seeds_from(request_seed_base(cfg, tag), 0, n)


class StudyPaths:
    """Where one study's files live."""

    def __init__(self, cfg_or_dir: Config | str | Path):
        self.root = Path(cfg_or_dir.results_dir if isinstance(cfg_or_dir, Config) else cfg_or_dir)

    def _dir(self, *parts) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    # folders
    @property
    def cache(self) -> Path:
        return self._dir("cache")

    @property
    def manifests(self) -> Path:
        return self._dir("manifests")

    @property
    def figures(self) -> Path:
        return self._dir("figures")

    @property
    def tables(self) -> Path:
        return self._dir("tables")

    @property
    def metrics_dir(self) -> Path:
        return self._dir("metrics")

    @property
    def grid(self) -> Path:
        return self.root / "grid"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def synthetic(self, name: str) -> Path:
        return self.root / "synthetic" / name

    # files
    @property
    def config_json(self) -> Path:
        return self.root / "config.json"

    @property
    def report(self) -> Path:
        return self.root / "REPORT.md"

    @property
    def readme_block(self) -> Path:
        """The results block stage 07 renders for the README (spliced in by `hdlib readme`)."""
        return self.root / "README_block.md"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def target_cache(self) -> Path:
        return self.root / "cache" / "target.pt"

    @property
    def pool_cache(self) -> Path:
        return self.root / "cache" / "pool.pt"

    @property
    def latents_cache(self) -> Path:
        return self.root / "cache" / "latents.pt"

    @property
    def fractions_csv(self) -> Path:
        return self.root / "manifests" / "fractions.csv"

    def manifest(self, split: str) -> Path:
        return self.root / "manifests" / f"{split}.csv"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def table(self, name: str) -> Path:
        return self.root / "tables" / f"{name}.csv"

    def figure(self, name: str) -> Path:
        return self.root / "figures" / f"{name}.png"


def percent_text(fraction: float) -> str:
    """A label fraction as a percentage with the digits it has: 0.025 -> '2.5%', 0.0125 -> '1.25%'
    (a '.0%' format printed them as '2%' and '1%')."""
    return f"{float(fraction) * 100:.4g}%"

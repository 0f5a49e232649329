"""Stage 06: generation quality at the smallest fraction and the first label draw,
compared fairly: every set is cut to the same number of images per class (so equal
size and class balance), FID / KID / precision / recall overall and FID / KID per
class (averaged over classes), in the reference classifier's feature space, against
the real test set. Also the near-copy (memorisation) view: synthetic images beside
their nearest labeled training image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..evaluation.metrics import fid_kid, precision_recall
from ..paths import StudyPaths, synthetic_set_name
from ..study.splits import (
    first_draw,
    load_split_images,
    smallest_fraction,
    split_images,
    split_labels,
)
from ..study.synthetic_sets import load_set, set_images

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "study.mixed_precision", "data.classes", "data.image_size",
               "downstream.fractions", "downstream.seeds", "downstream.eval_every",
               "downstream.pretrained_weights", "downstream.reference_backbone",
               "downstream.reference_train", "quality"],
    "files": ["synthetic/", "models/reference_classifier/", "metrics/04_synthesis.json"],
}


# (label in tables and figures, generator, filtered?)
QUALITY_SETS = [("histodiffusion", "histodiffusion", True), ("histodiffusion_unfiltered", "histodiffusion", False),
                ("pretrained", "pretrained", False), ("scratch", "scratch", True),
                ("scratch_unfiltered", "scratch", False), ("classifier_free", "classifier_free", True),
                ("classifier_free_unfiltered", "classifier_free", False)]


def _rows(df: pd.DataFrame, filtered: bool, label: int, n: int) -> pd.DataFrame:
    g = df[df["label"] == label]
    g = g[g["kept"]].sort_values("rank") if filtered else g.sort_values("index")
    return g.head(n)


def _found_sets(cfg: Config) -> dict[str, tuple[pd.DataFrame, bool]]:
    """{set label: (manifest, filtered?)} of the quality sets stage 04 wrote at the smallest fraction, first draw."""
    f, d = smallest_fraction(cfg), first_draw(cfg)
    found = {}
    for label, gen, filtered in QUALITY_SETS:
        path = StudyPaths(cfg).synthetic(synthetic_set_name(gen, f, d)) / "manifest.csv"
        if path.exists():
            found[label] = (pd.read_csv(path), filtered)
    return found


def _cut(found: dict, classes: list[int], cap: int) -> tuple[dict[str, pd.DataFrame], int]:
    """Every set cut to the same images per class over `classes` (the smallest set's count, at most cap)."""
    n = min([cap] + [len(_rows(df, flt, c, 10**9)) for df, flt in found.values() for c in classes])
    return {label: pd.concat([_rows(df, flt, c, n) for c in classes]) for label, (df, flt) in found.items()}, n


def quality_sets(cfg: Config) -> tuple[dict[str, pd.DataFrame], int]:
    """{set label: manifest rows} cut to the same images per class (at most
    quality.samples_per_class), and that number. A set with fewer than 2 images in some
    class is left out here (its shortfall is in 04's accounting; `shared_class_sets` compares it
    on the classes it has). 'pretrained' is unguided: its class label is only the request's, so it
    enters the overall metrics only."""
    K = len(cfg.data.classes)
    found = _found_sets(cfg)
    usable = {label: v for label, v in found.items() if min(len(_rows(*v, c, 10**9)) for c in range(K)) >= 2}
    if not usable:
        return {}, 0
    return _cut(usable, list(range(K)), cfg.quality.samples_per_class)


def shared_class_sets(cfg: Config) -> tuple[dict[str, pd.DataFrame], int, list[int], dict[str, list[str]]]:
    """Every set stage 04 wrote, the filtered ones included when the filter kept no image of some class:
    cut to the classes every set holds at least 2 images of, the same images per class. Returns (sets, images
    per class, those classes' ids, {set: the classes it lacks})."""
    K, names = len(cfg.data.classes), list(cfg.data.classes)
    found = _found_sets(cfg)
    counts = {label: [len(_rows(df, flt, c, 10**9)) for c in range(K)] for label, (df, flt) in found.items()}
    missing = {label: [names[c] for c in range(K) if n[c] < 2] for label, n in counts.items()}
    shared = [c for c in range(K) if all(n[c] >= 2 for n in counts.values())]
    if not found or not shared:
        return {}, 0, shared, missing
    sets, n = _cut(found, shared, cfg.quality.samples_per_class)
    return sets, n, shared, missing


def quality_table(cfg: Config, sets: dict[str, pd.DataFrame], features_fn,
                  classes: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall, per_class): FID / KID / precision / recall against the real test set (its images of
    `classes` only, when given), and FID / KID per class (their class mean is in the overall table as
    fid_class_mean / kid_class_mean). `kid_resolved`: KID more than two of its subset stds above 0; KID is
    unbiased, so with few images a set as close as real ones scores around 0, negative as often as not."""
    q = cfg.quality
    real_f = features_fn(split_images(cfg, "target_test"))
    real_y = split_labels(cfg, "target_test").numpy()
    if classes is not None:
        real_f, real_y = real_f[np.isin(real_y, classes)], real_y[np.isin(real_y, classes)]
    rows, per_class = [], []
    for name, frame in sets.items():
        if len(frame) < 4:
            rows.append({"set": name, "n": int(len(frame))})
            continue
        fake_f, labels = features_fn(set_images(cfg, frame)), frame["label"].to_numpy()
        fk = fid_kid(real_f, fake_f, kid_subset_size=min(q.kid_subset_size, len(frame), len(real_f)))
        pr = precision_recall(real_f, fake_f, k=q.pr_k)
        n_classes = len(cfg.data.classes) if classes is None else len(classes)
        row = {"set": name, "n": int(len(frame)), "per_class": int(len(frame) // n_classes), **fk, **pr,
               "kid_resolved": bool(fk["kid_mean"] - 2 * fk["kid_std"] > 0)}
        if name != "pretrained":
            cls_rows = _per_class_scores(cfg, name, real_f, real_y, fake_f, labels)
            per_class += cls_rows
            if cls_rows:
                row["fid_class_mean"] = float(np.mean([r["fid"] for r in cls_rows]))
                row["kid_class_mean"] = float(np.mean([r["kid_mean"] for r in cls_rows]))
        rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(per_class)


def _per_class_scores(cfg: Config, name: str, real_f, real_y, fake_f, labels) -> list[dict]:
    rows = []
    for k, cls in enumerate(cfg.data.classes):
        rf, ff = real_f[real_y == k], fake_f[labels == k]
        if len(ff) >= 2 and len(rf) >= 2:
            ck = fid_kid(rf, ff, kid_subset_size=min(cfg.quality.kid_subset_size, len(ff), len(rf)))
            rows.append({"set": name, "class": cls, "n": int(len(ff)), **ck})
    return rows


def nearest_training_examples(cfg: Config, n: int = 8) -> dict[str, torch.Tensor]:
    """For each generator's set at the smallest fraction (first draw): the n candidates
    closest to a labeled training image, and those training images (rows of a figure)."""
    f, d = smallest_fraction(cfg), first_draw(cfg)
    rows = {}
    for gen in ("histodiffusion", "scratch", "classifier_free"):
        path = StudyPaths(cfg).synthetic(synthetic_set_name(gen, f, d)) / "manifest.csv"
        if not path.exists():
            continue
        df = load_set(cfg, synthetic_set_name(gen, f, d))
        if "nn_distance" not in df or df["nn_distance"].isna().all():
            continue
        closest = df.sort_values("nn_distance").head(n)
        syn = torch.stack([set_images(cfg, closest)[i][0] for i in range(len(closest))])
        real, _ = load_split_images(cfg, "target_train", closest["nn_train_index"].to_numpy())
        rows[f"{gen}: closest samples"] = syn
        rows[f"{gen}: nearest labeled image"] = real
    return rows


__all__ = ["QUALITY_SETS", "quality_sets", "shared_class_sets", "quality_table", "nearest_training_examples", "load_set"]

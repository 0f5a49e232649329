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
from ..study.splits import load_split_images, split_images, split_labels
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


def quality_sets(cfg: Config) -> tuple[dict[str, pd.DataFrame], int]:
    """{set label: manifest rows} cut to the same images per class (at most
    quality.samples_per_class), and that number. A set with fewer than 2 images in some
    class is left out (its shortfall is in 04's accounting). 'pretrained' is unguided: its
    class label is only the request's, so it enters the overall metrics only."""
    f, d = min(cfg.downstream.fractions), cfg.downstream.seeds[0]
    K = len(cfg.data.classes)
    found = {}
    for label, gen, filtered in QUALITY_SETS:
        path = StudyPaths(cfg).synthetic(synthetic_set_name(gen, f, d)) / "manifest.csv"
        if path.exists():
            found[label] = (pd.read_csv(path), filtered)
    smallest = {label: min(len(_rows(df, flt, c, 10**9)) for c in range(K)) for label, (df, flt) in found.items()}
    usable = {label: v for label, v in found.items() if smallest[label] >= 2}  # too few kept: left out, not padded
    if not usable:
        return {}, 0
    n = min([cfg.quality.samples_per_class] + [smallest[label] for label in usable])
    return {label: pd.concat([_rows(df, flt, c, n) for c in range(K)]) for label, (df, flt) in usable.items()}, n


def quality_table(cfg: Config, sets: dict[str, pd.DataFrame], features_fn) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall, per_class): FID / KID / precision / recall against the real test set, and FID /
    KID per class (their class mean is in the overall table as fid_class_mean / kid_class_mean)."""

    q = cfg.quality
    real_f = features_fn(split_images(cfg, "target_test"))
    real_y = split_labels(cfg, "target_test").numpy()
    rows, per_class = [], []
    for name, frame in sets.items():
        if len(frame) < 4:
            rows.append({"set": name, "n": int(len(frame))})
            continue
        fake_f, labels = features_fn(set_images(cfg, frame)), frame["label"].to_numpy()
        fk = fid_kid(real_f, fake_f, kid_subset_size=min(q.kid_subset_size, len(frame), len(real_f)))
        pr = precision_recall(real_f, fake_f, k=q.pr_k)
        row = {"set": name, "n": int(len(frame)), "per_class": int(len(frame) // len(cfg.data.classes)), **fk, **pr}
        if name != "pretrained":
            cls_rows = []
            for k, cls in enumerate(cfg.data.classes):
                rf, ff = real_f[real_y == k], fake_f[labels == k]
                if len(ff) >= 2 and len(rf) >= 2:
                    ck = fid_kid(rf, ff, kid_subset_size=min(q.kid_subset_size, len(ff), len(rf)))
                    cls_rows.append({"set": name, "class": cls, "n": int(len(ff)), **ck})
            per_class += cls_rows
            if cls_rows:
                row["fid_class_mean"] = float(np.mean([r["fid"] for r in cls_rows]))
                row["kid_class_mean"] = float(np.mean([r["kid_mean"] for r in cls_rows]))
        rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(per_class)


def nearest_training_examples(cfg: Config, n: int = 8) -> dict[str, torch.Tensor]:
    """For each generator's set at the smallest fraction (first draw): the n candidates
    closest to a labeled training image, and those training images (rows of a figure)."""
    f, d = min(cfg.downstream.fractions), cfg.downstream.seeds[0]
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


__all__ = ["QUALITY_SETS", "quality_sets", "quality_table", "nearest_training_examples", "load_set"]

"""Stage 06: FID / KID / precision / recall of the synthetic sets at the smallest
fraction, overall and per class, in the reference classifier's feature space."""

from __future__ import annotations

import pandas as pd
import torch

from ..config import Config
from ..paths import StudyPaths, synthetic_set_name

# (generator, filtered?) -> the set's label in tables and figures
QUALITY_SETS = [("histodiffusion", True), ("histodiffusion", False), ("pretrained", False),
                ("scratch", True), ("scratch", False), ("classifier_free", True), ("classifier_free", False)]


def quality_sets(cfg: Config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic image sets at the smallest grid fraction: {label: (images, labels)}."""
    f = min(cfg.downstream.fractions)
    sets = {}
    for gen, filtered in QUALITY_SETS:
        folder = StudyPaths(cfg).synthetic(synthetic_set_name(gen, f))
        if not (folder / "images.pt").exists() or (filtered and not (folder / "filter.csv").exists()):
            continue
        blob = torch.load(folder / "images.pt", weights_only=False)
        if filtered:
            keep = pd.read_csv(folder / "filter.csv")["keep"].to_numpy()
            sets[gen] = (blob["images"][keep], blob["labels"][keep])
        else:
            sets[f"{gen}_unfiltered" if gen != "pretrained" else gen] = (blob["images"], blob["labels"])
    return sets


def quality_table(cfg: Config, real_images, real_labels, sets: dict, features_fn) -> tuple[pd.DataFrame, pd.DataFrame]:
    """FID / KID / precision / recall overall, and FID / KID per class. Returns (overall, per_class)."""
    from ..metrics import fid_kid, precision_recall

    q = cfg.quality
    real_f = features_fn(real_images)
    rows, per_class = [], []
    for name, (imgs, labels) in sets.items():
        if len(imgs) < 2:
            rows.append({"set": name, "n": int(len(imgs))})
            continue
        fake_f = features_fn(imgs)
        fk = fid_kid(real_f, fake_f, kid_subset_size=min(q.kid_subset_size, len(imgs), len(real_f)))
        pr = precision_recall(real_f, fake_f, k=q.pr_k)
        rows.append({"set": name, "n": int(len(imgs)), **fk, **pr})
        for k, cls in enumerate(cfg.data.classes):
            rf, ff = real_f[real_labels == k], fake_f[labels == k]
            if len(ff) >= 2 and len(rf) >= 2:
                ck = fid_kid(rf, ff, kid_subset_size=min(q.kid_subset_size, len(ff), len(rf)))
                per_class.append({"set": name, "class": cls, "n": int(len(ff)), **ck})
    return pd.DataFrame(rows), pd.DataFrame(per_class)

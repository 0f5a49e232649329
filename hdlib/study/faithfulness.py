"""How synthetic images compare with the target, judged without the labels they were made for:
its look (Frechet distance, in a draw's real-only classifier's features, to the target's unlabeled
training images) and their class (the independent reference classifier's calls, beside those of the
latent classifier that guided them). Stage 04 and the adaptation-length measurement use them alike."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..evaluation.downstream import extract_features, predict
from ..evaluation.metrics import frechet_distance
from ..models.builders import encode_images
from .classifiers import SelectiveFilter
from .context import device
from .decisions import primary_fraction
from .generation import Generation
from .latent_models import load_latent_classifier
from .pseudo_labels import unlabeled_rows
from .splits import fraction_indices, split_images
from .synthetic_sets import _in_memory


def target_rows(cfg: Config, fraction: float, draw: int, n: int = 512) -> np.ndarray:
    """Up to n evenly spaced unlabeled target training rows of a draw (its labeled ones when none is left)."""
    rows = unlabeled_rows(cfg, fraction, draw)
    rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), n)).astype(int)] if len(rows) else rows
    return rows if len(rows) else fraction_indices(cfg, fraction, draw)


def target_features(cfg: Config, judge: SelectiveFilter, fraction: float, draw: int, n: int = 512):
    """Baseline-classifier features of (up to n, evenly spaced) unlabeled target training images:
    the target's look, with no label read."""
    return extract_features(judge.model, split_images(cfg, "target_train", target_rows(cfg, fraction, draw, n)),
                            batch_size=128, device=judge.device).double().numpy()


def frechet_to_target(judge: SelectiveFilter, images: torch.Tensor, target_f) -> float:
    """Frechet distance of samples to the target's unlabeled images, in the baseline's features."""
    feats = extract_features(judge.model, images, batch_size=128, device=judge.device).double().numpy()
    return frechet_distance(target_f, feats)


@torch.no_grad()
def guided_class_judgement(cfg: Config, frame: pd.DataFrame, reference, latent_classifier, gen: Generation):
    """(target labels, reference classifier's calls, guiding latent classifier's calls on the
    re-encoded image at t = 0) of one draw's HistoDiffusion images, in index order."""
    imgs, labels = _in_memory(cfg, frame.sort_values("index"))
    _, reference_pred = predict(reference, imgs, batch_size=128, device=device(cfg))
    z = encode_images(gen.vae, imgs, gen.scale, device=gen.device)
    t0 = torch.zeros(len(z), dtype=torch.long, device=gen.device)
    latent_classifier = latent_classifier.to(gen.device)
    latent_pred = torch.cat([latent_classifier(z[i:i + 64].to(gen.device), t0[i:i + 64]).argmax(1).cpu()
                             for i in range(0, len(z), 64)])  # batches: paper-size latents are 64x64
    return torch.as_tensor(labels), torch.as_tensor(reference_pred), latent_pred


def guided_faithfulness(cfg: Config, labels: torch.Tensor, reference_pred: torch.Tensor,
                        latent_pred: torch.Tensor) -> list[dict]:
    """Per target class: the share of guided samples the reference classifier gives their target
    class, its most frequent other call, and the share the latent classifier that guided them
    gives their target class. Where the latent classifier agrees and the reference does not,
    guidance satisfied the latent classifier without producing the class's appearance: the
    break is the latent classifier, not the sampler."""

    labels, reference_pred, latent_pred = (torch.as_tensor(v) for v in (labels, reference_pred, latent_pred))
    rows = []
    for c, name in enumerate(cfg.data.classes):
        m = labels == c
        if not m.any():
            continue
        wrong = reference_pred[m & (reference_pred != c)]
        top = int(torch.mode(wrong).values) if len(wrong) else None
        rows.append({"class": name, "n": int(m.sum()),
                     "reference_accuracy": float((reference_pred[m] == c).float().mean()),
                     "reference_most_frequent_other": cfg.data.classes[top] if top is not None else "",
                     "reference_most_frequent_other_share": float((wrong == top).float().sum() / m.sum()) if top is not None else 0.0,
                     "latent_classifier_agreement": float((latent_pred[m] == c).float().mean())})
    return rows


def class_faithfulness(cfg: Config, sets, reference, gen: Generation) -> dict[str, dict]:
    """Whether guided images show their target class, judged by the independent reference classifier,
    pooled over the primary cell's label draws (each judged with its own latent classifier): on the
    images the filter kept ("kept") and on every candidate ("candidates"). Each candidate is judged
    once; the kept ones are a subset. Each entry: {"accuracy" (balanced over the classes that have
    images), "n", "per_class", "classes_without_images"}."""
    judged = []
    for draw, frame in sets:
        if len(frame):
            frame = frame.sort_values("index")
            calls = guided_class_judgement(cfg, frame, reference, load_latent_classifier(cfg, primary_fraction(cfg), draw), gen)
            judged.append((torch.tensor(frame["kept"].to_numpy(dtype=bool)), *calls))  # a copy: the frame's array is read-only
    return {"kept": _faithfulness_summary(cfg, [(c[m], r[m], z[m]) for m, c, r, z in judged]),
            "candidates": _faithfulness_summary(cfg, [(c, r, z) for _, c, r, z in judged])}


def _faithfulness_summary(cfg: Config, judged: list) -> dict:
    """Pooled (target labels, reference calls, latent-classifier calls) -> the faithfulness entry."""
    judged = [j for j in judged if len(j[0])]
    if not judged:
        return {"accuracy": None, "n": 0, "per_class": [], "classes_without_images": list(cfg.data.classes)}
    labels, pred, latent_pred = (torch.cat([j[k] for j in judged]) for k in range(3))
    rows = guided_faithfulness(cfg, labels, pred, latent_pred)
    return {"accuracy": float(np.mean([r["reference_accuracy"] for r in rows])), "n": len(labels),
            "per_class": rows, "classes_without_images": [c for c in cfg.data.classes
                                                           if c not in {r["class"] for r in rows}]}

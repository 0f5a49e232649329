"""Two versions of the shipped model judged alike: the same provenance-trained judge (the long run's
committed one), the same held-out tiles and the same sample seeds, so the card's before/after reads on one
scale (each card's own numbers came from the judge of its day). Plus the card's figure of samples per tissue
class as the judge calls them, beside real held-out tiles it calls the same.

    python -m hdlib.pretrain.ship params/pretrain_demo.yaml --cooldown 4000+1000 --previous data/init/demo-pool-v3-model
"""

from __future__ import annotations

import torch

from ..config import Config
from ..evaluation import plots
from .judges import judge_id, tissue_group
from .scoring import ProvenanceScorer

PER_CLASS_FIGURE = "pretrain_per_class"


def judge_versions(cfg: Config, scorer: ProvenanceScorer, samples: dict[str, torch.Tensor], ddim_steps: int) -> dict:
    """Each version's samples (label -> uint8 tiles, the card's seeds) scored by `scorer` against the holdout."""
    real = scorer.grouped(scorer.real_mix)
    return {"judge": judge_id(cfg), "ddim_steps": ddim_steps, "holdout_tiles": int(len(scorer.real_f)),
            "real_shares": real, "tissue_classes": sorted({tissue_group(c) for c in scorer.classes if ":" in c}),
            "models": {label: {"samples": int(len(imgs)), **scorer(imgs)} for label, imgs in samples.items()}}


def per_class_figure(scorer: ProvenanceScorer, samples: torch.Tensor, label: str, n: int = 8):
    """Per tissue class (or real source), as the judge calls them: up to n samples, then n real held-out tiles."""
    real = scorer.real
    fake_calls = _groups(scorer, scorer.judge.features_and_calls(samples)[1])
    real_calls = _groups(scorer, scorer.judge.features_and_calls(real)[1])
    rows = {}
    for g in scorer.groups:
        mine = [i for i, c in enumerate(fake_calls) if c == g][:n]
        theirs = [i for i, c in enumerate(real_calls) if c == g][:n]
        rows[f"{g}: {label} ({sum(c == g for c in fake_calls)})"] = samples[mine]
        rows[f"{g}: real ({sum(c == g for c in real_calls)})"] = real[theirs]
    return plots.image_rows(rows, n=n, title=f"{label}'s samples per class, as the provenance-trained judge calls "
                                             "them (count among all samples), beside real held-out tiles it calls the same")


def _groups(scorer: ProvenanceScorer, calls: torch.Tensor) -> list[str]:
    return [tissue_group(scorer.classes[i]) for i in calls.tolist()]

"""The provenance-trained judge's verdict on a set of generated tiles, against the pool's held-out
tiles: FID, KID, precision and recall in its feature space, the mix of tissue classes it calls,
and each class's share relative to its real share. This is what ranks recipes and tracks a run;
the untrained judge's FID rides along as a second opinion."""

from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..evaluation.pool_judge import mixture, total_variation
from .judges import RandomResNetJudge, pool_judge, pool_quality, tissue_group
from .samples import holdout_images


class ProvenanceScorer:
    """Scores uint8 tiles [N, 3, H, W] against the pool holdout (features of the holdout computed once)."""

    def __init__(self, cfg: Config):
        self.judge, _ = pool_judge(cfg, progress=cfg.study.progress)
        self.real = real = holdout_images(cfg)
        self.real_f, real_c = self.judge.features_and_calls(real)
        self.classes = self.judge.classes
        self.real_mix = mixture(real_c, len(self.classes))
        self.groups = sorted({tissue_group(c) for c in self.classes})
        self.random_judge = RandomResNetJudge()
        self.random_real = self.random_judge(real)

    def grouped(self, mix) -> dict[str, float]:
        """Shares per tissue class (stain styles merged) or real source."""
        return {g: float(sum(m for c, m in zip(self.classes, mix) if tissue_group(c) == g)) for g in self.groups}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict:
        f, c = self.judge.features_and_calls(images)
        q = pool_quality(f, self.real_f)
        mix = mixture(c, len(self.classes))
        fake_g, real_g = self.grouped(mix), self.grouped(self.real_mix)
        ratio = {g: fake_g[g] / real_g[g] for g in self.groups if real_g[g] > 0}
        worst = min(ratio, key=ratio.get)
        return {"fid": q["fid"], "kid_mean": q["kid_mean"], "precision": q["precision"], "recall": q["recall"],
                "mixture_tv": total_variation(mix, self.real_mix),
                "tissue_mixture_tv": total_variation(np.array(list(fake_g.values())), np.array(list(real_g.values()))),
                "worst_share_ratio": float(ratio[worst]), "worst_share_class": worst,
                **{f"share_{g}": v for g, v in fake_g.items()},
                "random_judge_fid": pool_quality(self.random_judge(images), self.random_real)["fid"]}

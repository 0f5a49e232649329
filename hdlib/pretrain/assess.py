"""The exported model and the in-study recipe (several seeds), judged by the provenance-trained
judge: quality, the mixture of provenance classes, copying, and each autoencoder's ceiling; the
result goes into the exported card (`pool_judge`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..evaluation import plots
from ..evaluation.pool_judge import (
    copying_rate,
    mixture,
    provenance_labels,
    total_variation,
)
from ..io import atomic_write_json
from ..models.pretrained import load_vae, read_latent_info
from ..paths import StudyPaths
from ..study.latents import load_autoencoder
from ..study.splits import load_split_images, split_images, split_sources
from .export import update_card
from .judges import (
    RandomResNetJudge,
    autoencoder_ceiling,
    matched_size_fid,
    pool_judge,
    pool_quality,
    tissue_group,
)
from .samples import baseline_samples, exported_model_samples


def assess_with_pool_judge(cfg: Config, baselines: list[Config], model_dir: str | Path) -> dict:
    """The exported model and the baseline runs (one recipe, several seeds), judged by the
    provenance-trained judge against the holdout tiles of the sources all saw: quality, the mixture
    of provenance classes, copying, and each autoencoder's ceiling (held-out tiles passed through
    it). Writes metrics/pretrain_pool_judge.json and figures/pretrain_mixture.png."""
    matplotlib.use("Agg")
    paths, p = StudyPaths(cfg), cfg.pretrain
    judge, info = pool_judge(cfg, progress=cfg.study.progress)
    K = len(judge.classes)
    # the holdout of the sources every model saw, and the judge's accuracy on it
    shared = set.intersection(*(set(split_sources(b, "pool_holdout")) for b in baselines))
    hold = split_images(cfg, "pool_holdout")
    rows = [i for i, s_ in enumerate(split_sources(cfg, "pool_holdout")) if s_ in shared]
    real = load_split_images(cfg, "pool_holdout", rows)[0]
    truth = provenance_labels([hold.record(i) for i in rows])
    real_f, real_c = judge.features_and_calls(real)
    called = [judge.classes[i] for i in real_c.tolist()]
    acc = float(np.mean([a == b for a, b in zip(called, truth)]))
    tissue_acc = float(np.mean([tissue_group(a) == tissue_group(b) for a, b in zip(called, truth)]))
    random_judge = RandomResNetJudge()
    random_real = random_judge(real)

    n, steps = p.final_eval_samples, p.final_inference_steps
    runs = {"shipped": (cfg, exported_model_samples(cfg, model_dir, n, steps),
                        (load_vae(model_dir), read_latent_info(model_dir)["scaling_factor"]))}
    for b in baselines:
        runs[f"in_study_seed{b.study.seed}"] = (b, baseline_samples(cfg, b, n), (load_autoencoder(b), 1.0))
    hold_sha = _manifest_column(cfg, "pool_holdout", "sha1")
    g = torch.Generator().manual_seed(0)
    out = {"judge": {"architecture": "ResNet-18 (timm), trained from scratch on the pool's training split",
                     "classes": judge.classes, "train_tiles": info["train_tiles"], "steps": info["steps"],
                     "final_loss": info["final_loss"], "holdout_accuracy": acc, "holdout_tissue_accuracy": tissue_acc,
                     "holdout_tiles": len(rows), "holdout_tiles_of_unseen_class": sum(t not in judge.classes for t in truth)},
           "reference": f"{len(rows)} held-out pool tiles of the sources all models saw",
           "samples": n, "ddim_steps": steps, "model_dir": str(model_dir),
           "baseline_seeds": [b.study.seed for b in baselines],
           "split_half": pool_quality(real_f[0::2], real_f[1::2]),
           "split_half_random_judge": pool_quality(random_real[0::2], random_real[1::2])["fid"],
           "real_mixture": mixture(real_c, K).tolist(), "models": {}}
    for name, (run_cfg, imgs, (vae, scale)) in runs.items():
        f, c = judge.features_and_calls(imgs)
        # copying: the run's own training tiles vs as many held-out tiles it never saw (by content)
        mine = set(_manifest_column(run_cfg, "pool", "sha1"))
        unseen_rows = [i for i, r in enumerate(rows) if hold_sha[r] not in mine]
        own = _manifest_rows_sample(run_cfg, len(unseen_rows), g)
        own_f = judge.features_and_calls(load_split_images(run_cfg, "pool", own)[0])[0]
        mix = mixture(c, K)
        out["models"][name] = {
            **pool_quality(f, real_f),
            "matched_size": matched_size_fid(f, real_f[1::2], len(real_f[0::2])),
            "mixture": mix.tolist(), "mixture_tv": total_variation(mix, out["real_mixture"]),
            "copying_rate": copying_rate(f, own_f, real_f[unseen_rows]) if unseen_rows else None,
            "copying_reference_tiles": len(unseen_rows),
            "random_judge_fid": pool_quality(random_judge(imgs), random_real)["fid"],
            "autoencoder_ceiling": autoencoder_ceiling(vae, scale, real, real_f, truth, judge, random_judge,
                                                       random_real)}
    seeds = [v for k, v in out["models"].items() if k.startswith("in_study")]
    out["in_study_over_seeds"] = {
        key: {"mean": float(np.mean([fn(v) for v in seeds])), "sd": float(np.std([fn(v) for v in seeds], ddof=1))
              if len(seeds) > 1 else 0.0, "values": [fn(v) for v in seeds]}
        for key, fn in (("fid", lambda v: v["fid"]), ("matched_size_fid", lambda v: v["matched_size"]["mean"]),
                        ("mixture_tv", lambda v: v["mixture_tv"]), ("random_judge_fid", lambda v: v["random_judge_fid"]))}
    atomic_write_json(paths.metrics("pretrain_pool_judge"), out)
    groups = sorted({tissue_group(c) for c in judge.classes})

    def grouped(mix):
        return [float(sum(m for c, m in zip(judge.classes, mix) if tissue_group(c) == gname)) for gname in groups]

    mean_in_study = np.mean([v["mixture"] for v in seeds], axis=0)
    fig = plots.mixture_bars(groups, {"real holdout": grouped(out["real_mixture"]),
                                      "shipped model": grouped(out["models"]["shipped"]["mixture"]),
                                      f"in-study model (before; mean of {len(seeds)} seeds)": grouped(mean_in_study)},
                             title="What the samples are, as the provenance-trained judge calls them")
    plots.save(fig, cfg, "pretrain_mixture")
    return out


def assess_into_card(cfg: Config, baselines: list[Config]) -> None:
    """Judge the exported model (pretrain.export_dir) against the baselines and put the result, with
    its figure, into the model's card."""
    out = assess_with_pool_judge(cfg, baselines, cfg.pretrain.export_dir)
    update_card(cfg.pretrain.export_dir, "pool_judge", out,
                {"pretrain_mixture.png": StudyPaths(cfg).figure("pretrain_mixture")})
    s, b = out["models"]["shipped"], out["in_study_over_seeds"]
    print(f"[pretrain] provenance-trained judge (holdout accuracy {out['judge']['holdout_accuracy']:.3f}): "
          f"FID shipped {s['fid']:.2f} vs in-study {b['fid']['mean']:.2f} +- {b['fid']['sd']:.2f} "
          f"({len(b['fid']['values'])} seeds); split-half {out['split_half']['fid']:.2f}; mixture TV "
          f"{s['mixture_tv']:.3f} vs {b['mixture_tv']['mean']:.3f}; autoencoder ceiling "
          f"{s['autoencoder_ceiling']['fid']:.2f}", flush=True)


def _manifest_column(cfg: Config, split: str, column: str) -> list:
    return pd.read_csv(StudyPaths(cfg).manifest(split), usecols=[column])[column].tolist()


def _manifest_rows_sample(cfg: Config, n: int, g: torch.Generator) -> list[int]:
    total = len(pd.read_csv(StudyPaths(cfg).manifest("pool"), usecols=["sha1"]))
    return sorted(torch.randperm(total, generator=g)[:n].tolist())

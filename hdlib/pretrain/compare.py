"""The shipped model against another pre-training (the in-study recipe of the old default study)
and against other full runs on this pool, all judged alike by the untrained judge."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib
import torch

from ..config import Config
from ..errors import ConfigError
from ..evaluation import plots
from ..io import atomic_write_json
from ..paths import StudyPaths
from ..study.context import device
from ..study.latent_models import load_denoiser, noise_scheduler
from ..study.latents import latent_scale, load_autoencoder
from ..study.splits import load_split_images, split_sources
from .judges import RandomResNetJudge, judge_sensitivity, matched_size_fid, pool_quality
from .samples import final_quality, holdout_images, sample_images


def compare_pretraining(cfg: Config, baseline: Config) -> dict:
    """The shipped model against another pre-training (the in-study recipe of the old default
    study), judged alike: the same untrained-ResNet features, the same number of samples and
    DDIM steps, the same seeds, against the held-out pool tiles of the sources both saw.
    Writes metrics/pretrain_comparison.json and figures/pretrain_comparison.png."""
    matplotlib.use("Agg")
    p, paths = cfg.pretrain, StudyPaths(cfg)
    shared = set(split_sources(baseline, "pool_holdout"))
    src = split_sources(cfg, "pool_holdout")
    rows = [i for i, s_ in enumerate(src) if s_ in shared]
    real = load_split_images(cfg, "pool_holdout", rows)[0]
    judge = RandomResNetJudge()
    real_f = judge(real)
    final_quality(cfg, judge)  # samples the shipped model once (cached)
    ours = torch.load(paths.cache / "final_samples.pt")
    bvae = load_autoencoder(baseline)
    bscale = latent_scale(baseline)
    t = time.time()
    cached = StudyPaths(baseline).cache / "final_samples.pt"
    if cached.exists() and len(torch.load(cached)) == len(ours):
        theirs = torch.load(cached)
    else:
        theirs = sample_images(load_denoiser(baseline, "denoiser_pretrained"), noise_scheduler(baseline), bvae,
                               bscale, len(ours), p.final_inference_steps, device=device(cfg),
                               progress=cfg.study.progress)
        torch.save(theirs, cached)
    full = holdout_images(cfg)
    full_f = judge(full)
    ours_f, theirs_f = judge(ours), judge(theirs)
    # the judge's noise floor: FID between the two halves of the reference (same distribution)
    split_half = pool_quality(real_f[0::2], real_f[1::2])
    others = {}
    for label, folder in (parse_other_run(x) for x in p.other_runs):
        samples = torch.load(Path(folder) / "cache" / "final_samples.pt")
        final = json.loads((Path(folder) / "metrics" / "pretrain_final.json").read_text())
        if len(samples) != len(ours):
            raise ConfigError(f"pretrain.other_runs: {folder} has {len(samples)} final samples, not {len(ours)}")
        f = judge(samples)
        others[label] = {"folder": str(folder), "steps": final["key"]["step"], **pool_quality(f, real_f),
                         "matched_size": matched_size_fid(f, real_f[1::2], len(real_f[0::2]))}
    out = {"other_runs": others,
           "reference_split_half": {k: split_half[k] for k in ("fid", "kid_mean", "precision", "recall")},
           "judge_sensitivity": judge_sensitivity(judge, real, real_f),
           # every model at the split-half's sample sizes, against the same second half of the holdout
           "matched_size": {"shipped": matched_size_fid(ours_f, real_f[1::2], len(real_f[0::2])),
                            "in_study": matched_size_fid(theirs_f, real_f[1::2], len(real_f[0::2]))},
           "reference": f"{len(real)} held-out pool tiles of the sources both models saw: {sorted(shared)}",
           "reference_full": f"all {len(full)} held-out tiles of the shipped model's pool (including sources "
                             "the in-study model never saw)", "shared_is_full": len(real) == len(full),
           "samples": len(ours), "ddim_steps": p.final_inference_steps, "judge": "untrained ResNet-18 (seed 0)",
           "shipped": pool_quality(ours_f, real_f), "in_study": pool_quality(theirs_f, real_f),
           "shipped_full": pool_quality(ours_f, full_f), "in_study_full": pool_quality(theirs_f, full_f),
           "in_study_recipe": {"autoencoder": baseline.autoencoder.block_out_channels,
                               "denoiser": baseline.diffusion.block_out_channels,
                               "steps": baseline.diffusion.pretrain.max_steps, "pool": baseline.data.pool_size},
           "in_study_sampling_s": time.time() - t}
    atomic_write_json(paths.metrics("pretrain_comparison"), out)
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:12]
    fig = plots.image_rows({"shipped model": ours[:12], "in-study model (before)": theirs[:12], "real holdout": real[pick]},
                           n=12, title="Unconditional samples, same seeds: shipped vs in-study pre-training")
    plots.save(fig, cfg, "pretrain_comparison")
    return out


def parse_other_run(text: str) -> tuple[str, Path]:
    """'label: results folder' -> (label, folder); the folder must hold a finished pre-training run."""
    label, sep, folder = text.partition(":")
    path = Path(folder.strip())
    if not sep or not label.strip() or not (path / "metrics" / "pretrain_final.json").exists():
        raise ConfigError(f"pretrain.other_runs: {text!r} is not 'label: folder of a finished pre-training run' "
                          "(make that run first; the params file says how, or set pretrain.other_runs=[])")
    return label.strip(), path

"""What the judges judge: unconditional samples of a model (the same seeds for every model), the
pool's held-out tiles (the real reference), and the finished model's quality at the card's sample
count (`final_quality`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import Config
from ..io import atomic_torch_save, atomic_write_json
from ..models.builders import decode_latents
from ..models.pretrained import (
    folder_sha256,
    load_scheduler,
    load_unet,
    load_vae,
    read_latent_info,
)
from ..paths import StudyPaths
from ..sampling.samplers import guided_ddim_sample
from ..study.context import device
from ..study.latent_models import load_denoiser, noise_scheduler
from ..study.latents import latent_scale, load_autoencoder
from ..study.splits import load_split_images, split_images
from .judges import RandomResNetJudge, pool_quality

EVAL_SEED = 10_000


@torch.no_grad()
def sample_images(unet, scheduler, vae, scale: float, n: int, steps: int, seed: int = EVAL_SEED,
                  device: str = "cpu", progress: bool = False, eta: float = 1.0) -> torch.Tensor:
    """n unconditional DDIM samples (eta 1 unless told) on `device`, decoded to uint8; image i uses seed + i."""
    C, S = unet.config.in_channels, unet.config.sample_size
    unet = unet.to(device)
    lat = guided_ddim_sample(unet, scheduler, torch.zeros(n, dtype=torch.long), torch.arange(n) + seed,
                             num_inference_steps=steps, eta=eta, latent_shape=(C, S, S), batch_size=64,
                             device=device, progress=progress)
    return decode_latents(vae, lat, scale, device=device)


def holdout_images(cfg: Config) -> torch.Tensor:
    """The pool's held-out tiles (never trained on): the judge's real reference."""
    return load_split_images(cfg, "pool_holdout", range(len(split_images(cfg, "pool_holdout"))))[0]


def exported_model_samples(cfg: Config, model_dir: str | Path, n: int, steps: int) -> torch.Tensor:
    """n unconditional samples (the card's seeds) of a diffusers-format folder, cached by its content."""
    digest = folder_sha256(model_dir)
    cached = StudyPaths(cfg).cache / f"exported_samples_{digest[:16]}_{n}_{steps}.pt"
    if cached.exists():
        return torch.load(cached)
    imgs = sample_images(load_unet(model_dir), load_scheduler(model_dir), load_vae(model_dir),
                         read_latent_info(model_dir)["scaling_factor"], n, steps, device=device(cfg),
                         progress=cfg.study.progress)
    atomic_torch_save(imgs, cached)
    return imgs


def baseline_samples(cfg: Config, baseline: Config, n: int) -> torch.Tensor:
    """n samples of the baseline (in-study) run, the same seeds and DDIM steps (cached in its folder)."""
    cached = StudyPaths(baseline).cache / "final_samples.pt"
    if cached.exists() and len(torch.load(cached)) == n:
        return torch.load(cached)
    scale = latent_scale(baseline)
    imgs = sample_images(load_denoiser(baseline, "denoiser_pretrained"), noise_scheduler(baseline),
                         load_autoencoder(baseline), scale, n, cfg.pretrain.final_inference_steps, device=device(cfg),
                         progress=cfg.study.progress)
    atomic_torch_save(imgs, cached)
    return imgs


def final_quality(cfg: Config, judge=None, real_feats=None, denoiser: str = "denoiser_pretrained",
                  step: int | None = None) -> dict:
    """Quality of the finished model (`denoiser`: the run, or a cool-down branch of it, at `step`) at the
    card's sample count and DDIM steps (cached by model and step)."""
    p, paths = cfg.pretrain, StudyPaths(cfg)
    path = paths.metrics("pretrain_final")
    key = {"step": step or cfg.diffusion.pretrain.max_steps, "samples": p.final_eval_samples,
           "ddim_steps": p.final_inference_steps, **({"denoiser": denoiser} if denoiser != "denoiser_pretrained" else {})}
    if path.exists() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    judge = judge or RandomResNetJudge()
    if real_feats is None:
        real_feats = judge(holdout_images(cfg))
    vae = load_autoencoder(cfg)
    scale = latent_scale(cfg)
    t = time.time()
    imgs = sample_images(load_denoiser(cfg, denoiser), noise_scheduler(cfg), vae, scale,
                         p.final_eval_samples, p.final_inference_steps, device=device(cfg), progress=cfg.study.progress)
    out = {"key": key, **pool_quality(judge(imgs), real_feats), "holdout": int(len(real_feats)),
           "sampling_s": time.time() - t}
    atomic_write_json(path, out)
    torch.save(imgs.clone(), paths.cache / "final_samples.pt")  # reused by the comparison
    return out

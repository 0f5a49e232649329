"""Stage 02: the unconditional latent denoiser (pre-trained on the pool, or loaded
from `pretrained.path`), its adaptations, and the from-scratch ablation."""

from __future__ import annotations

import pandas as pd
import torch

from ..config import Config
from ..paths import StudyPaths, model_name
from .common import read_metrics, require


def uses_pretrained_unet(cfg: Config) -> bool:
    """True when `pretrained.path` brings an unconditional unet (else the study trains one)."""
    if not cfg.pretrained.path:
        return False
    from ..pretrained import has_unet

    return has_unet(cfg.pretrained.path)


def latent_shape(cfg: Config) -> tuple:
    """(C, H, W) of the study's latents, as stage 01 recorded it."""
    return tuple(read_metrics(cfg, "01_autoencoder")["latent_shape"])


def noise_scheduler(cfg: Config):
    """The training (forward-process) scheduler: the pre-trained model's own when
    `pretrained.path` is set, else the one `diffusion` describes."""
    if uses_pretrained_unet(cfg):
        from ..pretrained import load_scheduler

        return load_scheduler(cfg.pretrained.path)
    from ..diffusion import make_noise_scheduler

    d = cfg.diffusion
    return make_noise_scheduler(d.schedule, d.num_train_timesteps, prediction_type=d.prediction_type)


def build_denoiser(cfg: Config, conditional: bool = False):
    """A fresh denoiser of the study's shape; adaptation and from-scratch models copy the
    pre-trained model's architecture when one is given, so they are comparable."""
    from ..models import build_unet

    C, _, S = latent_shape(cfg)
    K = len(cfg.data.classes) if conditional else None
    if uses_pretrained_unet(cfg):
        from ..pretrained import unet_like

        return unet_like(cfg.pretrained.path, num_classes=K)
    return build_unet(cfg.diffusion, C, S, num_classes=K)


def load_denoiser(cfg: Config, name: str, conditional: bool = False):
    """A trained denoiser by model name (EMA weights), frozen."""
    if name == "denoiser_pretrained" and uses_pretrained_unet(cfg):
        from ..pretrained import load_unet

        return load_unet(cfg.pretrained.path).eval().requires_grad_(False)
    from ..trainer import load_final

    unet = build_denoiser(cfg, conditional)
    load_final(unet, require(StudyPaths(cfg).model(name), f"denoiser {name}"), ema=True)
    return unet.eval().requires_grad_(False)


def grid_denoiser_name(cfg: Config, fraction: float) -> str:
    """The denoiser HistoDiffusion samples from at one fraction (diffusion.grid_adaptation)."""
    a = cfg.diffusion.grid_adaptation
    return "denoiser_pretrained" if a == "none" else model_name("denoiser_adapted", fraction, a)


def latent_fingerprint_features(latents: torch.Tensor) -> torch.Tensor:
    """Cheap per-image statistics of a latent (per-channel mean, std and gradient
    energy) used for the quick per-source realism check."""
    z = latents.float()
    gx = (z[..., 1:, :] - z[..., :-1, :]).pow(2).flatten(2).mean(2)
    gy = (z[..., :, 1:] - z[..., :, :-1]).pow(2).flatten(2).mean(2)
    return torch.cat([z.flatten(2).mean(2), z.flatten(2).std(2), (gx + gy).sqrt()], dim=1)


def per_source_realism(cfg: Config, sample_latents: dict[str, torch.Tensor], per_source: int = 512) -> pd.DataFrame:
    """Frechet distance between latent statistics of samples and of each real source
    (pool sources and the target; up to `per_source` latents each). Lower = closer; it
    says which data a model imitates."""
    import numpy as np

    from ..metrics import feature_stats, frechet_distance
    from .autoencoder import latent_store
    from .data import split_sources

    store = latent_store(cfg)
    src = np.array(split_sources(cfg, "pool"))
    real = {n: store.means("pool", np.flatnonzero(src == n)[:per_source]) for n in dict.fromkeys(src)}
    real["target"] = store.means("target_train", np.arange(min(per_source, len(store.mean("target_train")))))
    stats = {n: feature_stats(latent_fingerprint_features(z).numpy()) for n, z in real.items() if len(z) > 2}
    rows = []
    for model, z in sample_latents.items():
        mu, sig = feature_stats(latent_fingerprint_features(z).numpy())
        for n, (m2, s2) in stats.items():
            rows.append({"model": model, "source": n, "frechet": float(frechet_distance(mu, sig, m2, s2))})
    return pd.DataFrame(rows)


def unconditional_samples(cfg: Config, models: list[str], n: int, tag: str, progress: bool = False,
                          decode: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{model name: (latents, uint8 images or None without `decode`)}: n unguided samples of
    each named denoiser, the same seeds (request `tag`) for every model, so rows are comparable."""
    from ..models import decode_latents
    from ..paths import request_seeds
    from ..sampling import guided_ddim_sample
    from .autoencoder import latent_scale, load_autoencoder
    from .common import device

    s, dev = cfg.sampling, device(cfg)
    vae, sched = load_autoencoder(cfg), noise_scheduler(cfg)
    scale = latent_scale(cfg)
    seeds = torch.as_tensor(request_seeds(cfg, tag, n))
    out = {}
    for name in models:
        z = guided_ddim_sample(load_denoiser(cfg, name), sched, torch.zeros(n, dtype=torch.long), seeds,
                               num_inference_steps=s.num_inference_steps, eta=s.eta, latent_shape=latent_shape(cfg),
                               batch_size=s.batch_size, device=dev, progress=progress)
        out[name] = (z, decode_latents(vae, z, scale, device=dev) if decode else None)
    return out

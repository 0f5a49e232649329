"""Stage 02: the unconditional latent denoiser (pre-trained on the pool, or loaded
from `pretrained.path`), its adaptations, and the from-scratch ablation."""

from __future__ import annotations

import pandas as pd
import torch

from ..config import Config
from ..evaluation.metrics import frechet_distance
from ..models.builders import decode_latents
from ..paths import request_seeds
from ..sampling.samplers import guided_ddim_sample
from ..study.context import device
from ..study.latent_models import latent_shape, load_denoiser, noise_scheduler
from ..study.latents import latent_scale, latent_store, load_autoencoder
from ..study.splits import split_sources

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "study.mixed_precision", "data.classes", "data.image_size",
               "data.labeled_val_every", "autoencoder", "pretrained", "diffusion", "downstream.fractions",
               "downstream.seeds", "downstream.training_sets", "downstream.ratio_sweep",
               "downstream.ratio_sweep_fraction", "downstream.ratio_sweep_sets", "sampling.batch_size",
               "sampling.eta", "sampling.num_inference_steps"],
    "files": ["cache/latents/", "models/autoencoder/", "metrics/01_autoencoder.json"],
}


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

    store = latent_store(cfg)
    src = np.array(split_sources(cfg, "pool"))
    real = {n: store.means("pool", np.flatnonzero(src == n)[:per_source]) for n in dict.fromkeys(src)}
    real["target"] = store.means("target_train", np.arange(min(per_source, len(store.mean("target_train")))))
    real_f = {n: latent_fingerprint_features(z).numpy() for n, z in real.items() if len(z) > 2}
    rows = []
    for model, z in sample_latents.items():
        f = latent_fingerprint_features(z).numpy()
        for n, rf in real_f.items():
            rows.append({"model": model, "source": n, "frechet": frechet_distance(rf, f)})
    return pd.DataFrame(rows)


def unconditional_samples(cfg: Config, models: list[str], n: int, tag: str, progress: bool = False,
                          decode: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{model name: (latents, uint8 images or None without `decode`)}: n unguided samples of
    each named denoiser, the same seeds (request `tag`) for every model, so rows are comparable."""

    s, dev = cfg.sampling, device(cfg)
    vae, sched = load_autoencoder(cfg), noise_scheduler(cfg)
    scale = latent_scale(cfg)
    seeds = torch.as_tensor(request_seeds(cfg, tag, n))
    out = {}
    for name in models:
        unet = load_denoiser(cfg, name).to(dev)  # loaded on the CPU; the sampler runs on dev
        z = guided_ddim_sample(unet, sched, torch.zeros(n, dtype=torch.long), seeds,
                               num_inference_steps=s.num_inference_steps, eta=s.eta, latent_shape=latent_shape(cfg),
                               batch_size=s.batch_size, device=dev, progress=progress)
        out[name] = (z, decode_latents(vae, z, scale, device=dev) if decode else None)
    return out

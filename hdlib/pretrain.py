"""Pre-train once on the unlabeled pool and ship the result in diffusers format.

    python -m hdlib pretrain params/pretrain_demo.yaml [key=value ...]

Builds the pool (stage 00's data code), trains the autoencoder, encodes the pool,
then trains the unconditional latent denoiser in chunks of `pretrain.eval_every`
steps. After each chunk it samples from the EMA weights and measures FID/KID and
precision/recall against the pool's held-out tiles. Every step is resumable: the
trainer resumes from its latest checkpoint, and evaluations already written are
not repeated. At the end the model is exported (vae/, unet/, scheduler/,
hdlib_latent.json) with a MODEL_CARD.md.

Judge of quality: a fixed, randomly initialised ResNet-18 (seed 0, no training).
It needs no labels and no downloaded weights, it is the same for every model it
compares, and it cannot be tuned toward either; random-init embeddings rank
generators consistently (Naeem et al. 2020, "Reliable fidelity and diversity
metrics"). Its absolute values are not comparable with Inception FIDs.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import Config
from .io import atomic_write_csv, atomic_write_json

JUDGE_SEED = 0
JUDGE_IMAGE_SIZE = 128


class RandomResNetJudge(torch.nn.Module):
    """uint8 images -> 512-d pooled features of a seeded, untrained ResNet-18."""

    def __init__(self, seed: int = JUDGE_SEED, image_size: int = JUDGE_IMAGE_SIZE):
        super().__init__()
        import timm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # zero_init_last=False: with it, every residual branch starts at zero and the
            # untrained net would be little more than its stem.
            self.net = timm.create_model("resnet18", pretrained=False, num_classes=0, zero_init_last=False)
        self.net.eval().requires_grad_(False)
        self.image_size = image_size

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        out = []
        for i in range(0, len(images_uint8), batch_size):
            x = images_uint8[i:i + batch_size].float() / 255.0
            x = torch.nn.functional.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True,
                                                align_corners=False)
            out.append(self.net((x - 0.5) / 0.25).double())
        return torch.cat(out)


def pool_quality(fake_features: torch.Tensor, real_features: torch.Tensor, k: int = 3) -> dict:
    from .metrics import fid_kid, precision_recall

    n = min(len(fake_features), len(real_features))
    q = fid_kid(real_features.numpy(), fake_features.numpy(), kid_subset_size=min(100, n))
    q.update(precision_recall(real_features.numpy(), fake_features.numpy(), k=k))
    return q


@torch.no_grad()
def sample_images(unet, scheduler, vae, scale: float, n: int, steps: int, seed: int, device: str = "cpu",
                  progress: bool = False) -> torch.Tensor:
    """n unconditional DDIM (eta=1) samples, decoded to uint8; image i uses seed + i."""
    from .models import decode_latents
    from .sampling import guided_ddim_sample

    C, S = unet.config.in_channels, unet.config.sample_size
    lat = guided_ddim_sample(unet, scheduler, torch.zeros(n, dtype=torch.long), torch.arange(n) + seed,
                             num_inference_steps=steps, eta=1.0, latent_shape=(C, S, S), batch_size=64,
                             device=device, progress=progress)
    return decode_latents(vae, lat, scale, device=device)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_pretrain(cfg: Config) -> dict:
    from . import study
    from .diffusion import make_noise_scheduler
    from .train import train_task

    p = cfg.pretrain
    if p.threads:
        torch.set_num_threads(p.threads)
    out = cfg.results_dir
    metrics_dir = out / "metrics"
    t0 = time.time()
    if not (study.cache_dir(cfg) / "pool.pt").exists():
        study.prepare_data(cfg)
    train_task(cfg, "autoencoder")
    if not (study.cache_dir(cfg) / "latents.pt").exists():
        study.autoencoder_stage(cfg)
    vae, scale = study.load_autoencoder(cfg)
    pool = study.load_pool(cfg)
    judge = RandomResNetJudge()
    real_feats = judge(pool["holdout_images"])
    sched = make_noise_scheduler(cfg.diffusion.schedule, cfg.diffusion.num_train_timesteps,
                                 prediction_type=cfg.diffusion.prediction_type)

    eval_path = metrics_dir / "pretrain_eval.csv"
    rows = pd.read_csv(eval_path).to_dict("records") if eval_path.exists() else []
    done = {int(r["step"]) for r in rows}
    total = cfg.diffusion.pretrain.max_steps
    targets = list(range(p.eval_every, total, p.eval_every)) + [total]
    for target in targets:
        if target in done:
            continue
        cfg.diffusion.pretrain.max_steps = target  # constant lr: the run extends chunk by chunk
        res = train_task(cfg, "denoiser_pretrain")
        unet = study.load_denoiser(cfg, "ldm_pretrained")
        imgs = sample_images(unet, sched, vae, scale, p.eval_samples, p.eval_inference_steps, seed=10_000)
        q = pool_quality(judge(imgs), real_feats)
        rows.append({"step": target, "samples": p.eval_samples, "ddim_steps": p.eval_inference_steps,
                     **q, "train_wall_s": res.wall_s, "loss": res.last_loss})
        atomic_write_csv(pd.DataFrame(rows), eval_path)
        print(f"[pretrain] step {target}: FID {q['fid']:.2f} KID {q['kid_mean']:.4f} "
              f"P {q['precision']:.3f} R {q['recall']:.3f}", flush=True)
    cfg.diffusion.pretrain.max_steps = total
    summary = {"eval": rows, "wall_s_this_call": time.time() - t0}
    atomic_write_json(metrics_dir / "pretrain_summary.json", summary)
    return summary


def main(params: str, overrides=()) -> int:
    from .config import load_config

    cfg = load_config(params, list(overrides))
    run_pretrain(cfg)
    return 0

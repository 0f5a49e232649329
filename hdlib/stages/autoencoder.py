"""Stage 01: the autoencoder (trained here, or loaded from `pretrained.path`), the
latent scale (1/std of pool latents), the latent cache, reconstruction quality."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..io import atomic_torch_save, atomic_write_csv
from ..paths import StudyPaths
from .common import device, require, write_metrics
from .data import load_pool, load_target


def load_autoencoder(cfg: Config):
    """The study's autoencoder (eval mode, frozen): the pre-trained one when
    `pretrained.path` is set, else the one stage 01 trained."""
    if cfg.pretrained.path:
        from ..pretrained import load_vae

        return load_vae(cfg.pretrained.path).eval().requires_grad_(False)
    from ..models import build_autoencoder
    from ..trainer import load_final

    vae = build_autoencoder(cfg.autoencoder)
    load_final(vae, require(StudyPaths(cfg).model("autoencoder"), "autoencoder"), ema=False)
    return vae.eval().requires_grad_(False)


def latent_scale(cfg: Config, raw_pool_latents: torch.Tensor | None = None) -> float:
    """1/std of the raw pool latents; a pre-trained model brings its own (measured on its pool)."""
    if cfg.pretrained.path:
        from ..pretrained import read_latent_info

        return float(read_latent_info(cfg.pretrained.path)["scaling_factor"])
    return 1.0 / float(raw_pool_latents.std())


def autoencoder_stage(cfg: Config) -> dict:
    """Encode every split once (posterior means) and evaluate reconstructions on held-out
    pool tiles per source and on the target's validation split."""
    from ..models import decode_latents, encode_images, psnr_ssim

    dev, paths = device(cfg), StudyPaths(cfg)
    vae = load_autoencoder(cfg)
    pool, target = load_pool(cfg), load_target(cfg)
    raw_pool = encode_images(vae, pool["images"], 1.0, device=dev, progress=cfg.study.progress)
    scale = latent_scale(cfg, raw_pool)
    enc = lambda x: encode_images(vae, x, scale, device=dev)  # noqa: E731
    latents = {
        "scale": scale, "classes": target["classes"],
        "pool": raw_pool * scale, "pool_source_ids": pool["source_ids"],
        "train": enc(target["train_images"]), "train_labels": target["train_labels"],
        "val": enc(target["val_images"]), "val_labels": target["val_labels"],
        "test": enc(target["test_images"]), "test_labels": target["test_labels"],
    }
    atomic_torch_save(latents, paths.latents_cache)

    rows = []
    sets = [(name, pool["holdout_images"][pool["holdout_source_ids"] == i]) for i, name in enumerate(pool["sources"])]
    sets.append(("target (val)", target["val_images"]))
    for name, imgs in sets:
        if len(imgs) == 0:
            continue
        rec = decode_latents(vae, encode_images(vae, imgs, 1.0, device=dev), 1.0, device=dev)
        psnr, ssim = psnr_ssim(imgs, rec)
        rows.append({"source": name, "n": len(imgs), "psnr_db": float(psnr.mean()), "psnr_std": float(psnr.std()),
                     "ssim": float(ssim.mean())})
    atomic_write_csv(pd.DataFrame(rows), paths.table("autoencoder_reconstruction"))
    lat = latents["pool"]
    pool_rows = [r for r in rows if r["source"] != "target (val)"]
    metrics = {
        "pretrained": cfg.pretrained.path or None,
        "latent_shape": list(lat.shape[1:]), "scale_factor": scale, "raw_latent_std": float(raw_pool.std()),
        "scaled_latent_mean": float(lat.mean()), "scaled_latent_std": float(lat.std()),
        "per_channel_std": [float(v) for v in lat.transpose(0, 1).flatten(1).std(1)],
        "reconstruction": rows,
        "heldout_pool_psnr_db": float(np.average([r["psnr_db"] for r in pool_rows], weights=[r["n"] for r in pool_rows])),
    }
    write_metrics(cfg, "01_autoencoder", metrics)
    return metrics


def load_latents(cfg: Config) -> dict:
    return torch.load(require(StudyPaths(cfg).latents_cache, "latent cache"), weights_only=False)


def training_log(cfg: Config, name: str) -> pd.DataFrame:
    return pd.read_csv(require(StudyPaths(cfg).model(name) / "log.csv", f"training log of {name}"))


def reconstruction_examples(cfg: Config, n: int = 6) -> dict[str, torch.Tensor]:
    """Rows for the reconstruction figure: per pool source and for the target,
    n held-out originals followed by their reconstructions."""
    from ..models import decode_latents, encode_images

    vae, dev = load_autoencoder(cfg), device(cfg)
    pool, target = load_pool(cfg), load_target(cfg)
    rows = {}
    sets = [(n_, pool["holdout_images"][pool["holdout_source_ids"] == i]) for i, n_ in enumerate(pool["sources"])]
    sets.append(("target", target["val_images"][:: max(1, len(target["val_images"]) // n)]))
    for name, imgs in sets:
        imgs = imgs[:n]
        if len(imgs) == 0:
            continue
        rows[name] = imgs
        rows[f"{name} (recon)"] = decode_latents(vae, encode_images(vae, imgs, 1.0, device=dev), 1.0, device=dev)
    return rows

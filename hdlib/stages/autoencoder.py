"""Stage 01: the autoencoder (trained here, or loaded from `pretrained.path`), the
latent cache (every split encoded once, in a streaming pass, into memory-mapped
arrays; sharded across processes when `study.num_processes` > 1), the latent
scale (1/std of the pool's posterior means) and reconstruction quality."""

from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..models.builders import decode_latents, encode_images
from ..study.context import device
from ..study.latents import (
    encode_and_measure,
    load_autoencoder,
)
from ..study.splits import load_split_images, split_images, split_sources

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "study.mixed_precision", "data.image_size", "autoencoder", "pretrained"],
    "files": ["manifests/", "metrics/00_data.json"],
}


def reconstruction_examples(cfg: Config, n: int = 6) -> dict[str, torch.Tensor]:
    """Rows for the reconstruction figure: per pool source and for the target,
    n held-out originals followed by their reconstructions."""

    vae, dev = load_autoencoder(cfg), device(cfg)
    hold_src = np.array(split_sources(cfg, "pool_holdout"))
    sets = [(name, np.flatnonzero(hold_src == name)[:n], "pool_holdout") for name in dict.fromkeys(hold_src)]
    n_val = len(split_images(cfg, "target_val"))
    sets.append(("target", np.arange(0, n_val, max(1, n_val // n))[:n], "target_val"))
    rows = {}
    for name, idx, split in sets:
        if len(idx) == 0:
            continue
        imgs, _ = load_split_images(cfg, split, idx)
        rows[name] = imgs
        rows[f"{name} (recon)"] = decode_latents(vae, encode_images(vae, imgs, 1.0, device=dev), 1.0, device=dev)
    return rows


def autoencoder_stage(cfg: Config) -> dict:
    """Stage 01's work: the latent cache and reconstruction quality (`study.latents.encode_and_measure`)."""
    return encode_and_measure(cfg)

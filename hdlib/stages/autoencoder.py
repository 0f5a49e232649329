"""Stage 01: the autoencoder (trained here, or loaded from `pretrained.path`), the
latent cache (every split encoded once, in a streaming pass, into memory-mapped
arrays; sharded across processes when `study.num_processes` > 1), the latent
scale (1/std of the pool's posterior means) and reconstruction quality."""

from __future__ import annotations

import torch

from ..config import Config
from ..study.context import require
from ..study.latents import RECONSTRUCTION_EXAMPLES, encode_and_measure, reconstruction_examples_path

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "study.mixed_precision", "data.image_size", "autoencoder", "pretrained"],
    "files": ["manifests/", "metrics/00_data.json"],
}


def reconstruction_examples(cfg: Config, n: int = RECONSTRUCTION_EXAMPLES) -> dict[str, torch.Tensor]:
    """Rows for the reconstruction figure: per pool source and for the target, up to n held-out
    originals followed by their reconstructions (kept by `autoencoder_stage`, not computed again)."""
    rows = torch.load(require(reconstruction_examples_path(cfg), "reconstruction examples (stage 01)"))
    return {name: images[:n] for name, images in rows.items()}


def autoencoder_stage(cfg: Config) -> dict:
    """Stage 01's work: the latent cache and reconstruction quality (`study.latents.encode_and_measure`)."""
    return encode_and_measure(cfg)

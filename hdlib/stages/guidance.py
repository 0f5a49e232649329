"""Stage 03: the noise-aware latent classifier that guides sampling (trained on z_t
at random t, conditioned on t; flip/rot90 latent augmentation; selected on validation
accuracy by t), one per label fraction and label draw, and its accuracy by noise level."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import Config
from ..paths import StudyPaths, model_name
from .autoencoder import latent_store
from .common import require
from .diffusion import build_denoiser, latent_shape, noise_scheduler


def load_latent_classifier(cfg: Config, fraction: float, draw: int | None = None):
    """The selected (best validation) weights of one fraction's and draw's latent classifier."""
    from ..models import build_latent_classifier
    from ..trainer import load_final

    draw = cfg.downstream.seeds[0] if draw is None else draw
    C, _, S = latent_shape(cfg)
    skeleton = build_denoiser(cfg) if cfg.latent_classifier.backbone == "pretrained_unet" else None  # weights below
    clf = build_latent_classifier(cfg.latent_classifier, C, S, len(cfg.data.classes), encoder_unet=skeleton)
    folder = require(StudyPaths(cfg).model(model_name("latent_classifier", fraction, draw=draw)), "latent classifier")
    load_final(clf, folder, module="best" if (folder / "final" / "best").is_dir() else "model")
    return clf.eval().requires_grad_(False)


def accuracy_by_t(cfg: Config, fractions, draw: int | None = None, buckets: int = 10,
                  max_latents: int = 1024) -> pd.DataFrame:
    """Validation accuracy of each fraction's latent classifier on z_t, by t bucket."""
    from ..latent_classifier import accuracy_by_timestep_bucket

    store, sched = latent_store(cfg), noise_scheduler(cfg)
    rows = np.arange(min(max_latents, len(store.mean("target_val"))))
    z, y = store.means("target_val", rows), store.labels("target_val")[rows]
    tables = []
    for f in fractions:
        acc = accuracy_by_timestep_bucket(load_latent_classifier(cfg, f, draw), z, y, sched, buckets=buckets,
                                          seed=cfg.study.seed)
        tables.append(acc.assign(fraction=f))
    return pd.concat(tables, ignore_index=True)

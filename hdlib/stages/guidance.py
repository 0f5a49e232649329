"""Stage 03: the noise-aware latent classifier that guides sampling (trained on z_t
at random t, conditioned on t), and its accuracy by noise level."""

from __future__ import annotations

import pandas as pd

from ..config import Config
from ..paths import StudyPaths, model_name
from .autoencoder import load_latents
from .common import require
from .diffusion import latent_shape, noise_scheduler


def load_latent_classifier(cfg: Config, fraction: float):
    from ..models import build_latent_classifier
    from ..trainer import load_final

    C, _, S = latent_shape(cfg)
    clf = build_latent_classifier(cfg.latent_classifier, C, S, len(cfg.data.classes))
    name = model_name("latent_classifier", fraction)
    load_final(clf, require(StudyPaths(cfg).model(name), f"latent classifier {name}"), ema=False)
    return clf.eval().requires_grad_(False)


def accuracy_by_t(cfg: Config, fractions, buckets: int = 10) -> pd.DataFrame:
    """Validation accuracy of each fraction's latent classifier on z_t, by t bucket."""
    from ..latent_classifier import accuracy_by_timestep_bucket

    lat, sched = load_latents(cfg), noise_scheduler(cfg)
    tables = []
    for f in fractions:
        acc = accuracy_by_timestep_bucket(load_latent_classifier(cfg, f), lat["val"], lat["val_labels"], sched,
                                          buckets=buckets, seed=cfg.study.seed)
        tables.append(acc.assign(fraction=f))
    return pd.concat(tables, ignore_index=True)

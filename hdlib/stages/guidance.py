"""Stage 03: the noise-aware latent classifier that guides sampling (trained on z_t
at random t, conditioned on t; flip/rot90 latent augmentation; selected on validation
accuracy by t), one per label fraction and label draw, and its accuracy by noise level."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import Config
from ..latent_classifier import accuracy_by_timestep_bucket
from ..study.latent_models import load_latent_classifier, noise_scheduler
from ..study.latents import latent_store


def accuracy_by_t(cfg: Config, fractions, draw: int | None = None, buckets: int = 10,
                  max_latents: int = 1024) -> pd.DataFrame:
    """Validation accuracy of each fraction's latent classifier on z_t, by t bucket."""

    store, sched = latent_store(cfg), noise_scheduler(cfg)
    rows = np.arange(min(max_latents, len(store.mean("target_val"))))
    z, y = store.means("target_val", rows), store.labels("target_val")[rows]
    tables = []
    for f in fractions:
        acc = accuracy_by_timestep_bucket(load_latent_classifier(cfg, f, draw), z, y, sched, buckets=buckets,
                                          seed=cfg.study.seed)
        tables.append(acc.assign(fraction=f))
    return pd.concat(tables, ignore_index=True)

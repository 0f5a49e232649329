"""Stage 03: the noise-aware latent classifier that guides sampling (trained on z_t
at random t, conditioned on t; flip/rot90 latent augmentation; selected on validation
accuracy by t), one per label fraction and label draw, and its accuracy by noise level."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import Config
from ..models.latent_classifier import accuracy_by_timestep_bucket
from ..paths import StudyPaths, model_name
from ..study.latent_models import load_latent_classifier, noise_scheduler
from ..study.latents import latent_store
from ..study.pseudo_labels import confident_pseudo_labels
from ..study.splits import draws_for, split_labels

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "study.mixed_precision", "data.classes", "data.image_size",
               "data.labeled_val_every", "pretrained", "diffusion", "latent_classifier", "downstream",
               "sampling.method", "sampling.num_inference_steps", "sampling.guidance_interval",
               "sampling.guidance_interval_sweep"],
    "files": ["cache/latents/", "models/denoiser_*/", "metrics/02_diffusion.json"],
}


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


def latent_classifier_selection(cfg: Config, fractions, primary: float | None) -> pd.DataFrame:
    """One row per latent classifier (fraction, label draw): the step the trainer kept (its
    selection rule), the timesteps it was selected on, its validation accuracies, and with
    pseudo-labels their number and accuracy (judged with the hidden labels: reported, never used)."""
    threshold = cfg.latent_classifier.pseudo_label_threshold
    truth = split_labels(cfg, "target_train").numpy()
    rows = []
    for f in fractions:
        for d in draws_for(cfg, f, primary):
            ev = pd.read_csv(StudyPaths(cfg).model(model_name("latent_classifier", f, draw=d)) / "eval.csv")
            best = ev[ev["improved"].astype(bool)].iloc[-1]
            sel_t = [c[len("val_acc_sel_t"):] for c in ev.columns if c.startswith("val_acc_sel_t")]
            row = {"fraction": f, "draw": d, "selected_step": int(best["step"]),
                   "selection_timesteps": " ".join(sel_t), "val_acc_selection": best.get("val_acc_selection"),
                   "val_acc_t_lt_500": best["val_acc_t_lt_500"], "val_acc_all_t": best["val_acc_all_t"]}
            if threshold > 0:
                pl = confident_pseudo_labels(cfg, f, d, threshold)
                row["pseudo_labeled"] = len(pl)
                row["pseudo_label_accuracy"] = (float(np.mean(truth[pl["train_index"].to_numpy()] == pl["pred"].to_numpy()))
                                                if len(pl) else float("nan"))
            rows.append(row)
    return pd.DataFrame(rows)

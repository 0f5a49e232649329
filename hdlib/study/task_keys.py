"""What decides a trained model's weights besides its TrainConfig: the settings its model and loss read, the
images it learns from, and the weights it starts from or reads. The Trainer keys a run by both (TrainConfig's
`task_key`), so a model folder made with another objective, other images or another starting model is trained
anew, never reused: changing `diffusion.loss` used to leave the adapted denoiser of the previous loss in place.
"""

from __future__ import annotations

import hashlib
import json

from ..config import Config
from ..io import files_sha1
from ..models.pretrained import model_files_hashes
from ..paths import StudyPaths, model_name
from .generation import weights_key
from .latent_models import noise_scheduler
from .splits import manifest_hash

# diffusion settings that shape a denoiser's weights (its TrainingConfig is the Trainer's own key)
DENOISER_SETTINGS = ("block_out_channels", "layers_per_block", "attention_levels", "attention_head_dim",
                     "norm_num_groups", "loss", "snr_gamma", "timestep_sampling", "lognormal_mean", "lognormal_std")


def schedule_settings(cfg: Config) -> dict:
    """The forward process's settings, without diffusers' bookkeeping (`_use_default_values` is built from a
    set: its order changes from one process to the next, and with it a key that held it)."""
    return {k: v for k, v in noise_scheduler(cfg).config.items() if not k.startswith("_")}


def _section(section, *skip) -> dict:
    return {k: v for k, v in vars(section).items() if k not in ("train", *skip)}


def task_key(cfg: Config, task: str, fraction: float | None, adaptation: str | None, draw: int | None,
             labeled: bool) -> str:
    """sha1 of everything outside TrainConfig that one task's weights depend on."""
    parts: dict = {"task": task, "image_size": cfg.data.image_size}
    if task == "autoencoder":
        parts |= {"autoencoder": _section(cfg.autoencoder), "pool": manifest_hash(cfg, "pool"),
                  "init_from": model_files_hashes(cfg.autoencoder.init_from) if cfg.autoencoder.init_from else None}
    else:
        parts |= {"latents_of": weights_key(cfg, "autoencoder"), "schedule": schedule_settings(cfg)}
        rows = (fraction, draw) if labeled else (None, None)
        parts["images"] = manifest_hash(cfg, "pool" if task == "denoiser_pretrained" else "target_train", *rows)
    if task == "latent_classifier":
        lc = cfg.latent_classifier
        parts |= {"latent_classifier": _section(lc), "labeled_val_every": cfg.data.labeled_val_every}
        if lc.backbone == "pretrained_unet":
            parts["backbone"] = weights_key(cfg, "denoiser_pretrained")
        if lc.pseudo_label_threshold > 0:  # the draw's real-only classifier labels its extra images
            baseline = StudyPaths(cfg).model(model_name("baseline_classifier", fraction, draw=draw))
            parts["pseudo_labels_from"] = files_sha1([baseline / "model.pt"])
    elif task.startswith("denoiser_"):
        parts["diffusion"] = {k: getattr(cfg.diffusion, k) for k in DENOISER_SETTINGS}
        if task == "denoiser_classifier_free":
            parts["label_dropout"] = cfg.diffusion.classifier_free_label_dropout
        if task == "denoiser_adapted":
            parts["starts_from"] = weights_key(cfg, "denoiser_pretrained")
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

"""The study's trained latent models, loaded by name: denoisers and latent classifiers."""

from __future__ import annotations

from ..config import Config
from ..models.builders import build_latent_classifier, build_unet
from ..models.diffusion import make_noise_scheduler
from ..models.pretrained import has_unet, load_scheduler, load_unet, unet_like
from ..paths import StudyPaths, model_name
from ..training.weights import load_final
from .context import read_metrics, require
from .splits import first_draw


def uses_pretrained_unet(cfg: Config) -> bool:
    """True when `pretrained.path` brings an unconditional unet (else the study trains one)."""
    if not cfg.pretrained.path:
        return False

    return has_unet(cfg.pretrained.path)


def latent_shape(cfg: Config) -> tuple:
    """(C, H, W) of the study's latents, as stage 01 recorded it."""
    return tuple(read_metrics(cfg, "01_autoencoder")["latent_shape"])


def noise_scheduler(cfg: Config):
    """The training (forward-process) scheduler: the pre-trained model's own when
    `pretrained.path` is set, else the one `diffusion` describes."""
    if uses_pretrained_unet(cfg):
        return load_scheduler(cfg.pretrained.path)

    d = cfg.diffusion
    return make_noise_scheduler(d.schedule, d.num_train_timesteps, prediction_type=d.prediction_type)


def build_denoiser(cfg: Config, conditional: bool = False):
    """A fresh denoiser of the study's shape; adaptation and from-scratch models copy the
    pre-trained model's architecture when one is given, so they are comparable."""

    C, _, S = latent_shape(cfg)
    K = len(cfg.data.classes) if conditional else None
    if uses_pretrained_unet(cfg):
        return unet_like(cfg.pretrained.path, num_classes=K)
    return build_unet(cfg.diffusion, C, S, num_classes=K)


def load_denoiser(cfg: Config, name: str, conditional: bool = False):
    """A trained denoiser by model name (EMA weights), frozen."""
    if name == "denoiser_pretrained" and uses_pretrained_unet(cfg):
        return load_unet(cfg.pretrained.path).eval().requires_grad_(False)

    unet = build_denoiser(cfg, conditional)
    load_final(unet, require(StudyPaths(cfg).model(name), f"denoiser {name}"), ema=True)
    return unet.eval().requires_grad_(False)



def load_latent_classifier(cfg: Config, fraction: float, draw: int | None = None):
    """The selected (best validation) weights of one fraction's and draw's latent classifier."""

    draw = first_draw(cfg) if draw is None else draw
    C, _, S = latent_shape(cfg)
    skeleton = build_denoiser(cfg) if cfg.latent_classifier.backbone == "pretrained_unet" else None  # weights below
    clf = build_latent_classifier(cfg.latent_classifier, C, S, len(cfg.data.classes), encoder_unet=skeleton)
    folder = require(StudyPaths(cfg).model(model_name("latent_classifier", fraction, draw=draw)), "latent classifier")
    load_final(clf, folder, module="best" if (folder / "final" / "best").is_dir() else "model")
    return clf.eval().requires_grad_(False)

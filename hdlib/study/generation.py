"""Generation: a study's generators with every model loaded at most once."""

from __future__ import annotations

import dataclasses

import torch

from ..config import Config, check_guidance_interval
from ..errors import HDLibError
from ..io import files_sha1
from ..models.builders import decode_latents
from ..models.pretrained import folder_sha256
from ..paths import GENERATORS, StudyPaths, model_name
from ..sampling.pipeline import ClassifierGuidance, GuidedLatentPipeline
from .context import device, require
from .latent_models import (
    latent_shape,
    load_denoiser,
    load_latent_classifier,
    noise_scheduler,
    uses_pretrained_unet,
)
from .latents import latent_scale, load_autoencoder
from .splits import first_draw


def weights_key(cfg: Config, name: str) -> str:
    """Content key of a trained model's final weights (or of the pre-trained folder)."""

    if (name == "autoencoder" and cfg.pretrained.path) or (name == "denoiser_pretrained" and uses_pretrained_unet(cfg)):
        return folder_sha256(cfg.pretrained.path)
    return files_sha1([require(StudyPaths(cfg).model(name) / "final", f"model {name}")])


class Generation:
    """A study's generators, with every model loaded at most once. The decisions a stage
    made are arguments, never written into the config: `adaptation` (default
    `diffusion.grid_adaptation`), `guidance_scale` (default `sampling.guidance_scale`),
    `guidance_interval` = [t_low, t_high] or [] for every step (default
    `sampling.guidance_interval`) and `sampler` = (method, steps) (default `sampling.method`,
    `sampling.num_inference_steps`). `self.sampling` is the sampling section with them applied."""

    def __init__(self, cfg: Config, adaptation: str | None = None, guidance_scale: float | None = None,
                 sampler: tuple[str, int] | None = None, guidance_interval=None):
        self.cfg = cfg
        self.adaptation = adaptation or cfg.diffusion.grid_adaptation
        method, steps = sampler or (cfg.sampling.method, cfg.sampling.num_inference_steps)
        interval = list(cfg.sampling.guidance_interval if guidance_interval is None else guidance_interval)
        self.sampling = dataclasses.replace(
            cfg.sampling, method=method, num_inference_steps=int(steps),
            guidance_scale=cfg.sampling.guidance_scale if guidance_scale is None else float(guidance_scale),
            guidance_interval=[int(t) for t in interval])
        self.device = device(cfg)
        self.scheduler = noise_scheduler(cfg)
        check_guidance_interval(self.sampling.guidance_interval, int(self.scheduler.config.num_train_timesteps),
                                "guidance_interval")
        self.latent_shape = latent_shape(cfg)
        self.scale = latent_scale(cfg)
        self._vae = None
        self._models: dict[str, torch.nn.Module] = {}

    def denoiser_name(self, fraction: float, draw: int) -> str:
        a = self.adaptation
        if a == "none":
            return "denoiser_pretrained"
        return model_name("denoiser_adapted", fraction, a, draw if a == "labeled" else None)

    def models_of(self, generator: str, fraction: float, draw: int) -> dict:
        """{"denoiser": model name, "classifier": model name or None} of a generator."""
        clf = model_name("latent_classifier", fraction, draw=draw)
        if generator == "histodiffusion":
            return {"denoiser": self.denoiser_name(fraction, draw), "classifier": clf}
        if generator == "pretrained":
            return {"denoiser": self.denoiser_name(fraction, draw), "classifier": None}
        if generator == "scratch":
            return {"denoiser": model_name("denoiser_scratch", fraction, draw=draw), "classifier": clf}
        if generator == "classifier_free":
            return {"denoiser": model_name("denoiser_classifier_free", fraction, draw=draw), "classifier": None}
        if generator.startswith("denoiser_"):  # any named unconditional denoiser, unguided
            return {"denoiser": generator, "classifier": None}
        raise HDLibError(f"unknown generator {generator!r} (known: {', '.join(GENERATORS)})")

    def guidance_scale(self, generator: str, override: float | None = None) -> float:
        """The one place a generator's guidance scale is resolved."""
        s = self.sampling
        if generator == "classifier_free":
            return s.classifier_free_scale if override is None else float(override)
        if generator in ("pretrained",) or generator.startswith("denoiser_"):
            return 0.0
        return s.guidance_scale if override is None else float(override)

    def inputs_key(self, generator: str, fraction: float, draw: int) -> dict:
        """Content keys of every model a generator's samples depend on."""
        used = self.models_of(generator, fraction, draw)
        keys = {"autoencoder": weights_key(self.cfg, "autoencoder"),
                "denoiser": weights_key(self.cfg, used["denoiser"])}
        if used["classifier"] and self.guidance_scale(generator) > 0:
            keys["classifier"] = weights_key(self.cfg, used["classifier"])
        return keys

    def _model(self, name: str, loader):
        if name not in self._models:
            self._models[name] = loader().to(self.device)
        return self._models[name]

    @property
    def vae(self):
        if self._vae is None:
            self._vae = load_autoencoder(self.cfg).to(self.device)
        return self._vae

    def latents(self, generator: str, fraction: float, labels, seeds, guidance_scale: float | None = None,
                draw: int | None = None, progress: bool | None = None) -> torch.Tensor:
        s, cfg = self.sampling, self.cfg
        draw = first_draw(cfg) if draw is None else draw
        labels = torch.as_tensor(labels, dtype=torch.long)
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        kw = dict(latent_shape=self.latent_shape, batch_size=s.batch_size, device=self.device,
                  progress=cfg.study.progress if progress is None else progress)
        used = self.models_of(generator, fraction, draw)
        scale = self.guidance_scale(generator, guidance_scale)
        if generator == "classifier_free":  # classifier-free guidance (the baseline): DDIM, as it was trained to be used
            unet = self._model(used["denoiser"], lambda: load_denoiser(cfg, used["denoiser"], conditional=True))
            return GuidedLatentPipeline(unet, self.scheduler)(
                labels, seeds, method="ddim", num_inference_steps=s.num_inference_steps, eta=s.eta, cfg_scale=scale,
                null_label=len(cfg.data.classes), desc=f"CFG w={scale:g}", **kw)
        unet = self._model(used["denoiser"], lambda: load_denoiser(cfg, used["denoiser"]))
        clf = None
        if used["classifier"] and scale > 0:
            clf = self._model(used["classifier"], lambda: load_latent_classifier(cfg, fraction, draw))
        return GuidedLatentPipeline(unet, self.scheduler)(
            labels, seeds, method=s.method, num_inference_steps=s.num_inference_steps, eta=s.eta,
            cond_fn=ClassifierGuidance(clf) if clf is not None else None, guidance_scale=scale if clf else 0.0,
            guidance_interval=self.guidance_interval(), **kw)

    def guidance_interval(self) -> tuple[int, int] | None:
        """(t_low, t_high) the classifier guides in, or None for every step."""
        return tuple(self.sampling.guidance_interval) or None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents, self.scale, device=self.device)

"""The one training entry point for every trainable model of the study.

    python -m hdlib train TASK params/default.yaml [--fraction 0.05] [key=value ...]
    accelerate launch --num_processes 4 -m hdlib train TASK params/...   # N GPUs, no code change

TASK is one of TASKS below. Each task reads what earlier stages wrote into
results/<study>/cache/, trains with hdlib.trainer.Trainer (mixed precision,
gradient accumulation to a device-independent global batch, EMA, atomic
checkpoints every `checkpointing_steps`, automatic resume) and writes
results/<study>/models/<model name>/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import Config, TrainingConfig
from .errors import ConfigError, HDLibError
from .paths import StudyPaths, model_name, task_seed

TASKS = ("autoencoder", "denoiser_pretrained", "denoiser_adapted", "denoiser_scratch", "denoiser_classifier_free",
         "latent_classifier")


@dataclass
class TaskSpec:
    model: torch.nn.Module
    loss_fn: Callable
    tensors: tuple
    train: TrainingConfig
    name: str
    seed: int


def _per_sample_uniform(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=torch.Generator().manual_seed((int(s) + salt) % (2**63)))
                        for s in seeds])


def build_task(cfg: Config, task: str, fraction: float | None = None, adaptation: str | None = None) -> TaskSpec:
    """Model, loss and training tensors of one task, from the study's cached inputs."""
    from .diffusion import diffusion_loss, draw_noise_and_timesteps
    from .latent_classifier import classifier_loss
    from .models import autoencoder_loss, build_autoencoder, build_latent_classifier
    from .stages.autoencoder import load_latents
    from .stages.data import fraction_indices, load_pool
    from .stages.diffusion import build_denoiser, load_denoiser, noise_scheduler, uses_pretrained_unet

    if task not in TASKS:
        raise HDLibError(f"unknown training task {task!r} (tasks: {', '.join(TASKS)})")
    needs_fraction = task in ("denoiser_scratch", "denoiser_classifier_free", "latent_classifier") or (
        task == "denoiser_adapted" and adaptation == "labeled")
    if needs_fraction and fraction is None:
        raise HDLibError(f"task {task}: --fraction is required")
    if task == "denoiser_adapted" and adaptation not in ("labeled", "target_unlabeled"):
        raise HDLibError(f"task denoiser_adapted: --adaptation must be labeled or target_unlabeled, got {adaptation!r}")
    name = model_name(task, fraction, adaptation)
    seed = task_seed(cfg, name)

    if (task == "autoencoder" and cfg.pretrained.path) or (task == "denoiser_pretrained" and uses_pretrained_unet(cfg)):
        raise ConfigError(f"task {task}: pretrained.path is set ({cfg.pretrained.path}), so this model is "
                          "loaded, not trained; clear pretrained.path to train it")
    if task == "autoencoder":
        a = cfg.autoencoder
        x = load_pool(cfg)["images"].float() / 127.5 - 1.0

        def ae_loss(model, batch, seeds):
            return autoencoder_loss(model, batch[0], seeds, a.kl_weight, a.ssim_weight)

        return TaskSpec(build_autoencoder(a), ae_loss, (x,), a.train, name, seed)

    lat = load_latents(cfg)
    d = cfg.diffusion
    scheduler = noise_scheduler(cfg)
    shape = tuple(lat["pool"].shape[1:])
    C, S = shape[0], shape[-1]
    K = len(cfg.data.classes)

    def denoise_loss(model, batch, seeds):
        noise, t = draw_noise_and_timesteps(seeds, shape, d.num_train_timesteps)
        return diffusion_loss(model, batch[0], noise.to(batch[0].device), t.to(batch[0].device), scheduler,
                              loss_type=d.loss)

    if task == "denoiser_pretrained":
        return TaskSpec(build_denoiser(cfg), denoise_loss, (lat["pool"],), d.pretrain, name, seed)

    if task == "denoiser_adapted" and adaptation == "target_unlabeled":
        z, y = lat["train"], lat["train_labels"]
    else:
        idx = fraction_indices(cfg, fraction) if fraction is not None else slice(None)
        z, y = lat["train"][idx], lat["train_labels"][idx]

    if task == "denoiser_adapted":
        unet = load_denoiser(cfg, "denoiser_pretrained").requires_grad_(True).train()
        return TaskSpec(unet, denoise_loss, (z,), d.adapt, name, seed)

    if task == "denoiser_scratch":
        return TaskSpec(build_denoiser(cfg), denoise_loss, (z,), d.scratch, name, seed)

    if task == "denoiser_classifier_free":
        p_drop = d.classifier_free_label_dropout

        def classifier_free_loss(model, batch, seeds):
            z0, labels = batch
            drop = _per_sample_uniform(seeds, salt=7919).to(labels.device) < p_drop
            labels = torch.where(drop, torch.full_like(labels, K), labels)  # K = the null label
            noise, t = draw_noise_and_timesteps(seeds, shape, d.num_train_timesteps)
            return diffusion_loss(model, z0, noise.to(z0.device), t.to(z0.device), scheduler, loss_type=d.loss,
                                  class_labels=labels)

        return TaskSpec(build_denoiser(cfg, conditional=True), classifier_free_loss, (z, y), d.classifier_free, name, seed)

    # latent_classifier: noise-aware, trained on z_t at uniformly random t, conditioned on t
    clf = build_latent_classifier(cfg.latent_classifier, C, S, K)

    def clf_loss(model, batch, seeds):
        z0, labels = batch
        noise, t = draw_noise_and_timesteps(seeds, shape, d.num_train_timesteps)
        loss, _ = classifier_loss(model, z0, labels, noise.to(z0.device), t.to(z0.device), scheduler)
        return loss

    return TaskSpec(clf, clf_loss, (z, y), cfg.latent_classifier.train, name, seed)


def train_task(cfg: Config, task: str, fraction: float | None = None, adaptation: str | None = None,
               progress: bool | None = None):
    """Train one task in this process (resumes from its latest checkpoint)."""
    from .trainer import TensorBatchSource, TrainConfig, Trainer

    spec = build_task(cfg, task, fraction, adaptation)
    t = spec.train
    tc = TrainConfig(
        out_dir=str(StudyPaths(cfg).model(spec.name)),
        max_steps=t.max_steps,
        global_batch_size=t.batch_size,
        micro_batch_size=t.micro_batch_size or None,
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        grad_clip=t.grad_clip or None,
        ema_decay=t.ema_decay or None,
        mixed_precision=cfg.study.mixed_precision,
        checkpointing_steps=t.checkpointing_steps,
        seed=spec.seed,
        progress=cfg.study.progress if progress is None else progress,
    )
    return Trainer(spec.model, spec.loss_fn, TensorBatchSource(*spec.tensors), tc).train()


def launch_task(cfg: Config, params_file: str, overrides: list[str], task: str, fraction: float | None = None,
                adaptation: str | None = None):
    """Train in-process on one device, or in `study.num_processes` processes (one per GPU)."""
    if cfg.study.num_processes <= 1:
        return train_task(cfg, task, fraction, adaptation)
    from .launch import launch

    args = ["-m", "hdlib", "train", task, str(params_file)]
    if fraction is not None:
        args += ["--fraction", repr(fraction)]
    if adaptation is not None:
        args += ["--adaptation", adaptation]
    launch(args + list(overrides), cfg.study.num_processes)
    return None

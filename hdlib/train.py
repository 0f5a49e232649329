"""The one training entry point for every trainable model of the study.

    python -m hdlib.train TASK --params params/default.yaml [--fraction 0.05] [key=value ...]
    accelerate launch --num_processes 4 -m hdlib.train TASK --params ...   # N GPUs, no code change

TASK is one of TASKS below. Each task reads what earlier stages wrote into
results/<study>/cache/, trains with hdlib.trainer.Trainer (mixed precision,
gradient accumulation to a device-independent global batch, EMA, atomic
checkpoints every `checkpointing_steps`, automatic resume) and writes
results/<study>/models/<model name>/.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import Config, TrainingConfig, load_config
from .errors import HDLibError, one_line_errors

TASKS = ("autoencoder", "denoiser_pretrain", "denoiser_adapt", "denoiser_scratch", "denoiser_cfg",
         "latent_classifier")


def task_seed(cfg: Config, *parts) -> int:
    """A distinct, reproducible seed per (study seed, task, fraction ...)."""
    h = hashlib.sha1(repr((cfg.study.seed, *parts)).encode()).hexdigest()
    return int(h[:8], 16)


def model_name(task: str, fraction: float | None = None, adaptation: str | None = None) -> str:
    if task == "autoencoder":
        return "autoencoder"
    if task == "denoiser_pretrain":
        return "ldm_pretrained"
    if task == "denoiser_adapt":
        return f"ldm_adapted_{adaptation}" + (f"_f{fraction:g}" if adaptation == "labeled" else "")
    if task == "denoiser_scratch":
        return f"ldm_scratch_f{fraction:g}"
    if task == "denoiser_cfg":
        return f"ldm_cfg_f{fraction:g}"
    if task == "latent_classifier":
        return f"latent_classifier_f{fraction:g}"
    raise HDLibError(f"unknown training task {task!r} (tasks: {', '.join(TASKS)})")


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
    from . import study
    from .diffusion import diffusion_loss, draw_noise_and_timesteps, make_noise_scheduler
    from .latent_classifier import classifier_loss
    from .models import autoencoder_loss, build_autoencoder, build_latent_classifier, build_unet

    if task not in TASKS:
        raise HDLibError(f"unknown training task {task!r} (tasks: {', '.join(TASKS)})")
    needs_fraction = task in ("denoiser_scratch", "denoiser_cfg", "latent_classifier") or (
        task == "denoiser_adapt" and adaptation == "labeled")
    if needs_fraction and fraction is None:
        raise HDLibError(f"task {task}: --fraction is required")
    if task == "denoiser_adapt" and adaptation not in ("labeled", "target_unlabeled"):
        raise HDLibError(f"task denoiser_adapt: --adaptation must be labeled or target_unlabeled, got {adaptation!r}")
    name = model_name(task, fraction, adaptation)
    seed = task_seed(cfg, name)

    if task == "autoencoder":
        a = cfg.autoencoder
        images = study.load_pool_images(cfg)
        x = images.float() / 127.5 - 1.0

        def ae_loss(model, batch, seeds):
            return autoencoder_loss(model, batch[0], seeds, a.kl_weight, a.ssim_weight)

        return TaskSpec(build_autoencoder(a), ae_loss, (x,), a.train, name, seed)

    lat = study.load_latents(cfg)
    d = cfg.diffusion
    scheduler = make_noise_scheduler(d.schedule, d.num_train_timesteps, prediction_type=d.prediction_type)
    shape = tuple(lat["pool"].shape[1:])
    C, S = shape[0], shape[-1]
    K = len(cfg.data.classes)

    def denoise_loss(model, batch, seeds):
        noise, t = draw_noise_and_timesteps(seeds, shape, d.num_train_timesteps)
        return diffusion_loss(model, batch[0], noise.to(batch[0].device), t.to(batch[0].device), scheduler,
                              loss_type=d.loss)

    if task == "denoiser_pretrain":
        return TaskSpec(build_unet(d, C, S), denoise_loss, (lat["pool"],), d.pretrain, name, seed)

    if task in ("denoiser_adapt", "denoiser_scratch", "latent_classifier", "denoiser_cfg"):
        if task == "denoiser_adapt" and adaptation == "target_unlabeled":
            z, y = lat["train"], lat["train_labels"]
        else:
            idx = study.fraction_indices(cfg, fraction)
            z, y = lat["train"][idx], lat["train_labels"][idx]

    if task == "denoiser_adapt":
        from .trainer import load_final

        unet = build_unet(d, C, S)
        load_final(unet, study.model_dir(cfg, "ldm_pretrained"), ema=True)
        return TaskSpec(unet, denoise_loss, (z,), d.adapt, name, seed)

    if task == "denoiser_scratch":
        return TaskSpec(build_unet(d, C, S), denoise_loss, (z,), d.scratch, name, seed)

    if task == "denoiser_cfg":
        p_drop = d.cfg_label_dropout

        def cfg_loss(model, batch, seeds):
            z0, labels = batch
            drop = _per_sample_uniform(seeds, salt=7919).to(labels.device) < p_drop
            labels = torch.where(drop, torch.full_like(labels, K), labels)  # K = the null label
            noise, t = draw_noise_and_timesteps(seeds, shape, d.num_train_timesteps)
            return diffusion_loss(model, z0, noise.to(z0.device), t.to(z0.device), scheduler, loss_type=d.loss,
                                  class_labels=labels)

        return TaskSpec(build_unet(d, C, S, num_classes=K), cfg_loss, (z, y), d.cfg, name, seed)

    # latent_classifier: noise-aware, trained on z_t at uniformly random t, conditioned on t
    clf = build_latent_classifier(cfg.classifier, C, S, K)

    def clf_loss(model, batch, seeds):
        z0, labels = batch
        noise, t = draw_noise_and_timesteps(seeds, shape, d.num_train_timesteps)
        loss, _ = classifier_loss(model, z0, labels, noise.to(z0.device), t.to(z0.device), scheduler)
        return loss

    return TaskSpec(clf, clf_loss, (z, y), cfg.classifier.train, name, seed)


def train_task(cfg: Config, task: str, fraction: float | None = None, adaptation: str | None = None,
               progress: bool | None = None):
    """Train one task in this process (resumes from its latest checkpoint)."""
    from .study import model_dir
    from .trainer import TensorBatchSource, TrainConfig, Trainer

    spec = build_task(cfg, task, fraction, adaptation)
    t = spec.train
    tc = TrainConfig(
        out_dir=str(model_dir(cfg, spec.name)),
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
    """Train in-process on one device, or under `accelerate launch` on several."""
    if cfg.study.num_processes <= 1:
        return train_task(cfg, task, fraction, adaptation)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.study.num_processes),
           "--mixed_precision", cfg.study.mixed_precision, "-m", "hdlib.train", task, "--params", str(params_file)]
    if fraction is not None:
        cmd += ["--fraction", repr(fraction)]
    if adaptation is not None:
        cmd += ["--adaptation", adaptation]
    cmd += list(overrides)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise HDLibError(f"training task {task} failed under accelerate launch (exit {proc.returncode})")
    return None


@one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hdlib.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("--params", required=True)
    ap.add_argument("--fraction", type=float)
    ap.add_argument("--adaptation", choices=("labeled", "target_unlabeled"))
    ap.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"))
    ap.add_argument("--checkpointing_steps", type=int, help="override the task's checkpointing_steps")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.mixed_precision:
        overrides.append(f"study.mixed_precision={args.mixed_precision}")
    cfg = load_config(args.params, overrides)
    if args.checkpointing_steps:
        for t in (cfg.autoencoder.train, cfg.diffusion.pretrain, cfg.diffusion.adapt, cfg.diffusion.scratch,
                  cfg.diffusion.cfg, cfg.classifier.train):
            t.checkpointing_steps = args.checkpointing_steps
    train_task(cfg, args.task, args.fraction, args.adaptation)
    return 0


if __name__ == "__main__":
    sys.exit(main())

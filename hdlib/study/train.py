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
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import Config, TrainingConfig
from ..data.latents import posterior_sample
from ..data.streaming import StreamingSource
from ..errors import ConfigError, HDLibError
from ..models.builders import (
    autoencoder_loss,
    build_autoencoder,
    build_latent_classifier,
)
from ..models.diffusion import (
    diffusion_loss,
    draw_noise_and_timesteps,
    timestep_probabilities,
)
from ..models.latent_classifier import classifier_loss
from ..models.pretrained import check_init_vae, check_objective
from ..parallel.launch import launch
from ..paths import StudyPaths, model_name, task_seed
from ..sampling.samplers import sampler_timesteps
from ..training.batching import GroupPlan
from ..training.settings import TrainConfig
from ..training.trainer import Trainer
from .latent_models import (
    build_denoiser,
    load_denoiser,
    noise_scheduler,
    uses_pretrained_unet,
)
from .latents import latent_store
from .pseudo_labels import confident_pseudo_labels
from .splits import first_draw, fraction_indices, labeled_val_indices, split_images
from .task_keys import task_key

TASKS = ("autoencoder", "denoiser_pretrained", "denoiser_adapted", "denoiser_scratch", "denoiser_classifier_free",
         "latent_classifier")


@dataclass
class TaskSpec:
    model: torch.nn.Module
    loss_fn: Callable
    dataset: object              # TensorBatchSource, LatentSource or StreamingSource
    train: TrainingConfig
    name: str
    seed: int
    evaluate: Callable | None = None   # model selection on the validation split (classifiers)
    select: Callable | None = None
    eval_every: int = 0
    plan: object = None
    key: str = ""                      # hdlib.study.task_keys: what decides the weights besides `train`


def _per_sample_uniform(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=torch.Generator().manual_seed((int(s) + salt) % (2**63)))
                        for s in seeds])


def augment_latents(z: torch.Tensor, seeds: torch.Tensor, salt: int = 31_337) -> torch.Tensor:
    """Per-sample flips and 90-degree rotations of latents (tissue has no orientation; the
    autoencoder is convolutional, so a rotated image's latent is close to the rotated latent)."""
    k = (_per_sample_uniform(seeds, salt) * 8).long().clamp(max=7).tolist()
    out = []
    for zi, ki in zip(z, k):
        zi = torch.rot90(zi, ki % 4, dims=(-2, -1))
        out.append(zi.flip(-1) if ki >= 4 else zi)
    return torch.stack(out)


LATENT_CLASSIFIER_EVAL_T = (25, 100, 200, 300, 400, 500, 600, 700, 800, 900)


def latent_classifier_selection_timesteps(cfg: Config, scheduler) -> list[int]:
    """The timesteps the latent classifier is selected on: those the configured sampler
    (sampling.method, sampling.num_inference_steps) visits, built from the scheduler as the
    sampler builds them, restricted to sampling.guidance_interval when one is set (the steps it
    guides). The class is decided at large t, which a fixed t < 500 grid never looked at."""
    s = cfg.sampling
    ts = sampler_timesteps(scheduler, s.method, s.num_inference_steps, tuple(s.guidance_interval) or None)
    if not ts:
        raise ConfigError(f"sampling.guidance_interval: {list(s.guidance_interval)} holds none of the timesteps "
                          f"{s.method} visits in {s.num_inference_steps} steps, so guidance would never be applied")
    return ts


def latent_classifier_scores(model, z0: torch.Tensor, labels: torch.Tensor, scheduler, seed: int = 0,
                             selection_timesteps=()) -> dict:
    """Validation accuracy on z_t at fixed t (one fixed noise draw per t): per t, the mean
    over t < 500 and over all t of a fixed grid (for the report), and, with
    `selection_timesteps` (`latent_classifier_selection_timesteps`), `val_acc_selection`: the
    mean over those timesteps, each weighted equally, the model-selection score, with one
    column `val_acc_sel_t{t}` per timestep used (a grid t reuses its noise draw)."""
    dev = next(model.parameters()).device

    def accuracy_at(t: int, noise_seed: int) -> float:
        g = torch.Generator().manual_seed(noise_seed)
        noise = torch.randn(z0.shape, generator=g)
        tt = torch.full((len(z0),), t, dtype=torch.long)
        zt = scheduler.add_noise(z0, noise, tt)
        pred = torch.cat([model(zt[j:j + 256].to(dev), tt[j:j + 256].to(dev)).argmax(-1).cpu()
                          for j in range(0, len(z0), 256)])
        return float((pred == labels).float().mean())

    acc = {t: accuracy_at(t, seed * 1009 + i) for i, t in enumerate(LATENT_CLASSIFIER_EVAL_T)}
    low = [v for t, v in acc.items() if t < 500]
    out = {"val_acc_t_lt_500": sum(low) / len(low), "val_acc_all_t": sum(acc.values()) / len(acc),
           **{f"val_acc_t{t}": v for t, v in acc.items()}}
    if len(selection_timesteps):
        sel = {int(t): acc[int(t)] if int(t) in acc else accuracy_at(int(t), seed * 1009 + 10_000 + int(t))
               for t in selection_timesteps}
        out["val_acc_selection"] = sum(sel[int(t)] for t in selection_timesteps) / len(selection_timesteps)
        out["selection_timesteps"] = len(selection_timesteps)
        out.update({f"val_acc_sel_t{t}": v for t, v in sel.items()})
    return out


def _labeled_draw(cfg: Config, task: str, fraction, adaptation, draw) -> tuple[bool, int | None]:
    """Checks a task's arguments before any compute: (learns from a labeled subset, the label draw)."""
    if task not in TASKS:
        raise HDLibError(f"unknown training task {task!r} (tasks: {', '.join(TASKS)})")
    labeled = task in ("denoiser_scratch", "denoiser_classifier_free", "latent_classifier") or (
        task == "denoiser_adapted" and adaptation == "labeled")
    if labeled and fraction is None:
        raise HDLibError(f"task {task}: --fraction is required")
    if task == "denoiser_adapted" and adaptation not in ("labeled", "target_unlabeled"):
        raise HDLibError(f"task denoiser_adapted: --adaptation must be labeled or target_unlabeled, got {adaptation!r}")
    if (task == "autoencoder" and cfg.pretrained.path) or (task == "denoiser_pretrained" and uses_pretrained_unet(cfg)):
        raise ConfigError(f"task {task}: pretrained.path is set ({cfg.pretrained.path}), so this model is "
                          "loaded, not trained; clear pretrained.path to train it")
    return labeled, ((first_draw(cfg) if draw is None else int(draw)) if labeled else None)


def _autoencoder_task(cfg: Config, name: str, seed: int) -> TaskSpec:
    a = cfg.autoencoder

    def ae_loss(model, batch, seeds):
        return autoencoder_loss(model, batch[0], seeds, a.kl_weight, a.ssim_weight)

    pool = StreamingSource(split_images(cfg, "pool"), cfg.data.num_workers,
                           transform=lambda b: (b[0].float() / 127.5 - 1.0,))
    if a.init_from:  # before any compute
        check_init_vae(a.init_from, cfg.data.image_size)
    return TaskSpec(build_autoencoder(a, weights=True), ae_loss, pool, a.train, name, seed)


def _denoiser_losses(cfg: Config, shape, scheduler):
    """The unconditional denoising loss and the classifier-free one (labels dropped to the null label K)."""
    d, K = cfg.diffusion, len(cfg.data.classes)
    t_probs = timestep_probabilities(scheduler, d.timestep_sampling, d.lognormal_mean, d.lognormal_std)

    def denoise_loss(model, batch, seeds):
        z0 = posterior_sample(batch[0], batch[1], seeds)  # a fresh posterior draw every time
        noise, t = draw_noise_and_timesteps(seeds, shape, d.num_train_timesteps, t_probs)
        return diffusion_loss(model, z0, noise.to(z0.device), t.to(z0.device), scheduler, loss_type=d.loss,
                              snr_gamma=d.snr_gamma)

    def classifier_free_loss(model, batch, seeds):
        z0, labels = posterior_sample(batch[0], batch[1], seeds), batch[2]
        drop = _per_sample_uniform(seeds, salt=7919).to(labels.device) < d.classifier_free_label_dropout
        labels = torch.where(drop, torch.full_like(labels, K), labels)
        noise, t = draw_noise_and_timesteps(seeds, shape, d.num_train_timesteps, t_probs)
        return diffusion_loss(model, z0, noise.to(z0.device), t.to(z0.device), scheduler, loss_type=d.loss,
                              class_labels=labels, snr_gamma=d.snr_gamma)

    return denoise_loss, classifier_free_loss


def _latent_classifier_task(cfg: Config, store, scheduler, fraction, draw, name: str, seed: int) -> TaskSpec:
    """Noise-aware (z_t at uniformly random t, conditioned on t), flip/rot90 augmentation of latents,
    class-balanced batches, selected on validation accuracy at the timesteps the sampler guides."""
    lc, d, shape = cfg.latent_classifier, cfg.diffusion, store.shape
    rows = fraction_indices(cfg, fraction, draw)
    data = store.source("target_train", rows, labels=True)
    if lc.pseudo_label_threshold > 0:  # + the unlabeled images the draw's real-only classifier labels confidently
        extra = confident_pseudo_labels(cfg, fraction, draw, lc.pseudo_label_threshold)
        labeled = store.labels("target_train")[torch.from_numpy(rows)].numpy()
        data = store.source("target_train", np.concatenate([rows, extra["train_index"].to_numpy()]),
                            label_values=np.concatenate([labeled, extra["pred"].to_numpy()]))
    encoder = load_denoiser(cfg, "denoiser_pretrained") if lc.backbone == "pretrained_unet" else None
    clf = build_latent_classifier(lc, shape[0], shape[-1], len(cfg.data.classes), encoder_unet=encoder)

    def clf_loss(model, batch, seeds):
        z0, labels = posterior_sample(batch[0], batch[1], seeds), batch[2]
        if lc.augment:
            z0 = augment_latents(z0, seeds)
        noise, t = draw_noise_and_timesteps(seeds, shape, d.num_train_timesteps)
        loss, _ = classifier_loss(model, z0, labels, noise.to(z0.device), t.to(z0.device), scheduler)
        return loss

    if cfg.data.labeled_val_every:  # the draw's labeled validation images: inside its label budget
        val_split, val_rows = "target_train", np.sort(labeled_val_indices(cfg, fraction, draw))
    else:
        val_split = "target_val"
        val_rows = torch.randperm(len(store.mean("target_val")), generator=torch.Generator().manual_seed(0))
        val_rows = val_rows[:lc.eval_samples].sort().values.numpy()
    vz, vy = store.means(val_split, val_rows), store.labels(val_split)[torch.from_numpy(val_rows)]
    plan = GroupPlan(seed, [(torch.arange(len(data)), data.label_values, lc.train.batch_size)], balanced=True)
    select_t = latent_classifier_selection_timesteps(cfg, scheduler)  # before any compute: a ConfigError
    return TaskSpec(clf, clf_loss, data, lc.train, name, seed, plan=plan,
                    evaluate=lambda m: latent_classifier_scores(m, vz, vy, scheduler, selection_timesteps=select_t),
                    select=lambda r: (r["val_acc_selection"], r["val_acc_all_t"]),
                    eval_every=lc.eval_every or max(1, lc.train.max_steps // 10))


def build_task(cfg: Config, task: str, fraction: float | None = None, adaptation: str | None = None,
               draw: int | None = None) -> TaskSpec:
    """Model, loss and (streaming) training data of one task, from what earlier stages wrote.
    Models that learn from a labeled subset use label draw `draw` (default: the first seed)."""
    labeled, draw = _labeled_draw(cfg, task, fraction, adaptation, draw)
    name = model_name(task, fraction, adaptation, draw)
    seed = task_seed(cfg, name)
    # a model's initial weights come from its task's seed alone, never from what ran before in this process
    # (an evaluation's DataLoader draws from the global RNG); the caller's RNG state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        spec = _task_spec(cfg, task, fraction, adaptation, draw, labeled, name, seed)
    spec.key = task_key(cfg, task, fraction, adaptation, draw, labeled)
    return spec


def _task_spec(cfg: Config, task: str, fraction, adaptation, draw, labeled: bool, name: str, seed: int) -> TaskSpec:
    if task == "autoencoder":
        return _autoencoder_task(cfg, name, seed)
    store, d = latent_store(cfg), cfg.diffusion
    scheduler = noise_scheduler(cfg)
    if task == "latent_classifier":
        return _latent_classifier_task(cfg, store, scheduler, fraction, draw, name, seed)
    denoise_loss, classifier_free_loss = _denoiser_losses(cfg, store.shape, scheduler)
    if task == "denoiser_pretrained":
        return TaskSpec(build_denoiser(cfg), denoise_loss, store.source("pool"), d.pretrain, name, seed)
    data = store.source("target_train", None if not labeled else fraction_indices(cfg, fraction, draw), labels=True)
    if task == "denoiser_adapted":
        if uses_pretrained_unet(cfg):  # fine-tuned with the objective it was trained with, or an error
            check_objective(cfg.pretrained.path, cfg.diffusion)
        unet = load_denoiser(cfg, "denoiser_pretrained").requires_grad_(True).train()
        return TaskSpec(unet, denoise_loss, data, d.adapt, name, seed)
    if task == "denoiser_scratch":
        return TaskSpec(build_denoiser(cfg), denoise_loss, data, d.scratch, name, seed)
    return TaskSpec(build_denoiser(cfg, conditional=True), classifier_free_loss, data, d.classifier_free, name, seed)


def train_task(cfg: Config, task: str, fraction: float | None = None, adaptation: str | None = None,
               draw: int | None = None, progress: bool | None = None, out_dir: str | Path | None = None,
               precision_may_change: bool = False, keyed: bool = True, **train_overrides):
    """Train one task in this process (resumes from its latest checkpoint). `out_dir` replaces
    the task's model folder (recipe sweeps train variants of one task side by side);
    `precision_may_change`: a resume may use another study.mixed_precision (TrainConfig);
    `keyed`: the run is keyed by its task key too, and a folder made with another is trained anew
    (False: the long pre-training run, keyed by its recipe and resumed from checkpoints made before task keys);
    `train_overrides`: other TrainConfig fields (a pre-training cool-down's cooldown_start/_steps)."""

    spec = build_task(cfg, task, fraction, adaptation, draw)
    tc = TrainConfig.from_settings(spec.train, out_dir=out_dir or StudyPaths(cfg).model(spec.name), seed=spec.seed,
                                   mixed_precision=cfg.study.mixed_precision, device=cfg.study.device,
                                   max_memory_gb=cfg.study.max_memory_gb,
                                   progress=cfg.study.progress if progress is None else progress,
                                   precision_may_change=precision_may_change,
                                   **({"task_key": spec.key, "replace_stale": True} if keyed else {}), **train_overrides)
    return Trainer(spec.model, spec.loss_fn, spec.dataset, tc, plan=spec.plan, evaluate=spec.evaluate,
                   eval_every=spec.eval_every, select=spec.select).train()


def launch_task(cfg: Config, params_file: str, overrides: list[str], task: str, fraction: float | None = None,
                adaptation: str | None = None, draw: int | None = None):
    """Train in-process on one device, or in `study.num_processes` processes (one per GPU)."""
    if cfg.study.num_processes <= 1:
        return train_task(cfg, task, fraction, adaptation, draw)

    args = ["-m", "hdlib", "train", task, str(params_file)]
    if fraction is not None:
        args += ["--fraction", repr(fraction)]
    if adaptation is not None:
        args += ["--adaptation", adaptation]
    if draw is not None:
        args += ["--draw", str(draw)]
    launch(args + list(overrides), cfg.study.num_processes)
    return None

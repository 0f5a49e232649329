"""Noise schedules, the denoiser training loss, and per-sample training noise.

The denoiser is a `diffusers.UNet2DModel`; the forward process is a
`diffusers.DDPMScheduler`. Randomness is drawn by the caller (see
`draw_noise_and_timesteps`) so a training step is reproducible from its seeds.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DDPMScheduler

# name -> (diffusers beta_schedule, default beta_start, default beta_end)
_SCHEDULES = {
    # the authors' LDM schedule: linear in sqrt(beta) from 0.0015 to 0.0155
    "paper": ("scaled_linear", 0.0015, 0.0155),
    "linear": ("linear", 1e-4, 0.02),  # DDPM (Ho et al.)
    "cosine": ("squaredcos_cap_v2", None, None),  # Nichol & Dhariwal; betas come from the cosine
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("l1", "l2")


def make_noise_scheduler(schedule: str = "paper", num_train_timesteps: int = 1000, beta_start: float | None = None,
                         beta_end: float | None = None, prediction_type: str = "epsilon") -> DDPMScheduler:
    """The forward-process scheduler of one of the named schedules.

    `beta_start` / `beta_end` override the schedule's endpoints (ignored by "cosine").
    Clipping of the predicted x0 is off: latents are not bounded to [-1, 1]."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {sorted(_SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if int(num_train_timesteps) < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    beta_schedule, b0, b1 = _SCHEDULES[schedule]
    kwargs = {}
    if schedule != "cosine":
        kwargs = {"beta_start": b0 if beta_start is None else float(beta_start),
                  "beta_end": b1 if beta_end is None else float(beta_end)}
        if not 0 < kwargs["beta_start"] < kwargs["beta_end"] < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {kwargs['beta_start']}, {kwargs['beta_end']}")
    return DDPMScheduler(num_train_timesteps=int(num_train_timesteps), beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=False, **kwargs)


def diffusion_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser should output: the noise (epsilon) or the velocity v."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; expected one of {PREDICTION_TYPES}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v targets, so that low-noise steps stop dominating the loss."""
    abar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = abar / (1.0 - abar)
    clipped = torch.clamp(snr, max=float(gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def diffusion_loss(unet, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   loss_type: str = "l1", class_labels: torch.Tensor | None = None,
                   snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean L1 (paper) or L2 error between the denoiser output on z_t = add_noise(z0, noise, t)
    and the epsilon / v target, per sample weighted by min-SNR-gamma when `snr_gamma` > 0.
    `class_labels` feeds a class-conditional UNet."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if noise.shape != z0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from latent shape {tuple(z0.shape)}")
    if timesteps.shape != (z0.shape[0],):
        raise ValueError(f"timesteps must have shape ({z0.shape[0]},), got {tuple(timesteps.shape)}")
    z_t = scheduler.add_noise(z0, noise, timesteps)
    pred = unet(z_t, timesteps, class_labels=class_labels).sample
    target = diffusion_target(scheduler, z0, noise, timesteps)
    err = (pred.float() - target.float())
    err = err.abs() if loss_type == "l1" else err.square()
    per_sample = err.flatten(1).mean(1)
    if snr_gamma > 0:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma).to(per_sample.device)
    return per_sample.mean()


TIMESTEP_SAMPLINGS = ("uniform", "lognormal")


def timestep_probabilities(scheduler, kind: str = "uniform", mean: float = -0.5, std: float = 1.2
                           ) -> torch.Tensor | None:
    """How training timesteps are drawn: None for uniform (the paper), else a probability per
    timestep. "lognormal" is EDM's noise sampling (Karras et al. 2022), ln(sigma) ~ N(mean, std^2),
    carried to the discrete schedule: t gets the mass of the sigma interval around sigma_t =
    sqrt((1 - abar_t) / abar_t) (the end steps take the tails). EDM's -1.2 is for data of std 0.5;
    the study's latents have unit std, hence -0.5 (about -1.2 + ln 2)."""
    if kind not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"unknown timestep sampling {kind!r}; expected one of {TIMESTEP_SAMPLINGS}")
    if kind == "uniform":
        return None
    abar = scheduler.alphas_cumprod.double()
    log_sigma = 0.5 * torch.log((1 - abar) / abar)
    edges = (log_sigma[1:] + log_sigma[:-1]) / 2
    cdf = torch.distributions.Normal(float(mean), float(std)).cdf(edges)
    cdf = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf, torch.ones(1, dtype=cdf.dtype)])
    return (cdf[1:] - cdf[:-1]).clamp(min=0).float()


def draw_noise_and_timesteps(seeds, latent_shape: Sequence[int], num_train_timesteps: int,
                             timestep_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample training noise and timestep, each sample from its own generator seeded
    with its seed: a sample's draw does not depend on how the batch is split. Timesteps are
    uniform, or drawn from `timestep_probs` (`timestep_probabilities`).

    Returns (noise float32 [B, *latent_shape], timesteps int64 [B]) on the CPU."""
    seeds = torch.as_tensor(seeds, dtype=torch.long).reshape(-1)
    shape = tuple(int(s) for s in latent_shape)
    noise = torch.empty((len(seeds), *shape))
    timesteps = torch.empty(len(seeds), dtype=torch.long)
    if timestep_probs is not None and len(timestep_probs) != int(num_train_timesteps):
        raise ValueError(f"timestep_probs has {len(timestep_probs)} entries for {num_train_timesteps} timesteps")
    for i, seed in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(seed)
        if timestep_probs is None:
            timesteps[i] = torch.randint(0, int(num_train_timesteps), (1,), generator=g)
        else:
            timesteps[i] = torch.multinomial(timestep_probs, 1, generator=g)
        noise[i] = torch.randn(shape, generator=g)
    return noise, timesteps


__all__ = ["make_noise_scheduler", "diffusion_target", "diffusion_loss", "min_snr_weights", "draw_noise_and_timesteps",
           "timestep_probabilities", "PREDICTION_TYPES", "LOSS_TYPES", "TIMESTEP_SAMPLINGS"]

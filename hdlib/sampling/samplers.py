"""Samplers for latent diffusion with class control, as functions of (unet, scheduler, labels,
seeds): each is one call of the one guided pipeline (hdlib.sampling.pipeline.GuidedLatentPipeline), which
holds the loop.

* `guided_ddim_sample`: DDIM with classifier guidance on epsilon,
  eps_hat = eps - s * sqrt(1 - abar_t) * grad_{z_t} log p(y | z_t, t)   (s = 0: plain DDIM).
* `guided_ddpm_sample`: DDPM ancestral sampling, guidance as a mean shift
  mu + s * Sigma * grad_{z_t} log p(y | z_t, t).
* `guided_dpm_solver_sample`: DPM-Solver++ (2nd order), guidance on epsilon as for DDIM.
* `cfg_ddim_sample`: classifier-free guidance baseline with a class-conditional UNet.

Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval
improves sample and distribution quality"): `guidance_interval=(t_low, t_high)` applies the
classifier gradient only at steps whose training timestep t lies in [t_low, t_high]; at
the other steps the classifier is not called and the step is the unguided one. None (the
default) guides every step. `sampler_timesteps` lists the timesteps a sampler visits.

Reproducibility guarantee. Image i of a request draws its initial latent and every
step's noise from its own CPU generator seeded with seeds[i], so its random numbers
do not depend on the batch size, its position in a batch, its batch-mates or how the
request is sharded across devices (`shard`). The network forwards do depend on the
batch: CPU convolutions and matmuls (oneDNN, BLAS) pick kernels, blocking and
reduction order by batch shape, so they are not batch-invariant. Hence:

(a) bit-identical: the same request (labels, seeds, models, settings) with the same
    batch_size on the same machine and software (torch build, device, thread count)
    gives the same bits; on a GPU only with deterministic kernels
    (`torch.use_deterministic_algorithms(True)`);
(b) equal to float tolerance: another batch_size, order, set of batch-mates or
    sharding gives the same images up to rounding,
    |difference| <= 1e-4 * max(1, max |sample|) (measured: about 4e-7 of the sample
    scale after 8 guided steps; the 1e-4 that tests/test_sampling.py checks leaves
    room for other CPUs), far below what a wrong seed-to-image assignment would
    change (the order of the image's own magnitude).
"""

from __future__ import annotations

import torch

from .pipeline import (
    SAMPLER_METHODS,
    ClassifierGuidance,
    GuidedLatentPipeline,
    classifier_log_prob_grad,
    step_scheduler,
)


def sampler_timesteps(scheduler, method: str, num_inference_steps: int,
                      guidance_interval: tuple[int, int] | None = None) -> list[int]:
    """The training timesteps sampler `method` (ddim, ddpm, dpm_solver) visits in
    `num_inference_steps` steps, in sampling order (exactly those its UNet is called at);
    with `guidance_interval` only those in [t_low, t_high], the steps it guides."""
    return GuidedLatentPipeline(None, scheduler).timesteps(method, num_inference_steps, guidance_interval)


def _guidance_desc(name: str, guided: bool, guidance_scale: float, interval) -> str:
    if not guided:
        return name
    return f"{name} s={guidance_scale:g}" + (f" t in [{interval[0]}, {interval[1]}]" if interval is not None else "")


def _sample(method: str, name: str, unet, scheduler, labels, seeds, classifier, guidance_scale, interval,
            **kw) -> torch.Tensor:
    cond_fn = ClassifierGuidance(classifier) if classifier is not None else None
    guided = cond_fn is not None and guidance_scale != 0
    return GuidedLatentPipeline(unet, scheduler)(
        labels, seeds, method=method, cond_fn=cond_fn, guidance_scale=guidance_scale, guidance_interval=interval,
        desc=_guidance_desc(name, guided, guidance_scale, interval), **kw)


@torch.no_grad()
def guided_ddim_sample(unet, scheduler, labels, seeds, *, classifier=None, guidance_scale: float = 0.0,
                       num_inference_steps: int = 50, eta: float = 1.0, latent_shape, batch_size: int = 64,
                       device: str = "cpu", progress: bool = True,
                       guidance_interval: tuple[int, int] | None = None) -> torch.Tensor:
    """DDIM samples [N, *latent_shape] (on the CPU) with classifier guidance on epsilon.

    `scheduler` is the training scheduler (its betas, prediction type, spacing are used);
    eta = 0 is deterministic DDIM, eta = 1 the DDPM-like variance (the paper's setting).
    With guidance_scale = 0 or no classifier it is plain DDIM (`diffusers.DDIMPipeline`
    with one generator per image gives the same numbers). `guidance_interval` = (t_low, t_high)
    guides only the steps with t_low <= t <= t_high (None: every step)."""
    return _sample("ddim", "DDIM", unet, scheduler, labels, seeds, classifier, guidance_scale, guidance_interval,
                   num_inference_steps=num_inference_steps, eta=eta, latent_shape=latent_shape,
                   batch_size=batch_size, device=device, progress=progress)


@torch.no_grad()
def guided_ddpm_sample(unet, scheduler, labels, seeds, *, classifier=None, guidance_scale: float = 0.0,
                       num_inference_steps: int = 1000, latent_shape, batch_size: int = 64, device: str = "cpu",
                       progress: bool = True, guidance_interval: tuple[int, int] | None = None) -> torch.Tensor:
    """DDPM ancestral samples (posterior variance "fixed_small"); guidance shifts the mean,
    mu + s * Sigma_t * grad log p(y | z_t, t). Fewer steps than training use strided
    timesteps (diffusers' DDPMScheduler.set_timesteps). The per-step noise is drawn
    from each image's generator, only on steps with t > 0 (as DDPMScheduler does).
    `guidance_interval`: as in `guided_ddim_sample`."""
    return _sample("ddpm", "DDPM", unet, scheduler, labels, seeds, classifier, guidance_scale, guidance_interval,
                   num_inference_steps=num_inference_steps, latent_shape=latent_shape, batch_size=batch_size,
                   device=device, progress=progress)


@torch.no_grad()
def guided_dpm_solver_sample(unet, scheduler, labels, seeds, *, classifier=None, guidance_scale: float = 0.0,
                             num_inference_steps: int = 10, latent_shape, batch_size: int = 64,
                             device: str = "cpu", progress: bool = True,
                             guidance_interval: tuple[int, int] | None = None) -> torch.Tensor:
    """DPM-Solver++ (2nd-order multistep, diffusers' DPMSolverMultistepScheduler) with the same
    classifier guidance on epsilon as `guided_ddim_sample`. Deterministic after the initial
    latent, which comes from each image's generator; a fast sampler for 10-20 steps.
    `guidance_interval`: as in `guided_ddim_sample`."""
    return _sample("dpm_solver", "DPM-Solver++", unet, scheduler, labels, seeds, classifier, guidance_scale,
                   guidance_interval, num_inference_steps=num_inference_steps, latent_shape=latent_shape,
                   batch_size=batch_size, device=device, progress=progress)


@torch.no_grad()
def cfg_ddim_sample(cond_unet, scheduler, labels, seeds, *, null_label: int, cfg_scale: float,
                    num_inference_steps: int = 50, eta: float = 1.0, latent_shape, batch_size: int = 64,
                    device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """Classifier-free guidance with DDIM: eps = eps_null + w * (eps_y - eps_null), both
    from one forward pass of the class-conditional UNet on the doubled batch.
    w = 1 is the plain conditional model, w = 0 the unconditional (null-label) model."""
    return GuidedLatentPipeline(cond_unet, scheduler)(
        labels, seeds, method="ddim", num_inference_steps=num_inference_steps, eta=eta, cfg_scale=cfg_scale,
        null_label=null_label, latent_shape=latent_shape, batch_size=batch_size, device=device, progress=progress,
        desc=f"CFG w={cfg_scale:g}")


SAMPLERS = {"ddim": guided_ddim_sample, "ddpm": guided_ddpm_sample, "dpm_solver": guided_dpm_solver_sample}


# ---------------------------------------------------------------------------
# sharding a request across devices
# ---------------------------------------------------------------------------

def shard(n: int, rank: int, world_size: int) -> range:
    """Contiguous share of a request of n items for device `rank` of `world_size`
    (sizes differ by at most one; the first n % world_size ranks get the extra item)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


__all__ = ["classifier_log_prob_grad", "sampler_timesteps", "SAMPLER_METHODS", "SAMPLERS", "guided_ddim_sample",
           "guided_ddpm_sample", "guided_dpm_solver_sample", "cfg_ddim_sample", "shard", "step_scheduler"]

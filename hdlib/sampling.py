"""Samplers for latent diffusion with class control.

* `guided_ddim_sample`: DDIM with classifier guidance on epsilon,
  eps_hat = eps - s * sqrt(1 - abar_t) * grad_{z_t} log p(y | z_t, t)   (s = 0: plain DDIM).
* `guided_ddpm_sample`: DDPM ancestral sampling, guidance as a mean shift
  mu + s * Sigma * grad_{z_t} log p(y | z_t, t).
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

import operator
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm import tqdm

from .errors import DataError
from .placement import check_placement

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def classifier_log_prob_grad(classifier: torch.nn.Module, z: torch.Tensor, t: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    """grad_z log p(y | z, t) per sample (the classifier has no batch coupling, so the
    gradient of the summed log-probabilities is the per-sample gradient).

    Only the classifier is differentiated (z is a detached leaf), which keeps guidance cheap."""
    param = next(classifier.parameters(), None)
    dtype = param.dtype if param is not None else z.dtype
    with torch.enable_grad():
        z_in = z.detach().to(dtype).requires_grad_(True)
        log_probs = classifier(z_in, t).log_softmax(dim=-1)
        selected = log_probs.gather(1, labels.view(-1, 1).to(log_probs.device)).sum()
        (grad,) = torch.autograd.grad(selected, z_in)
    return grad.to(z.dtype)


def _model_output_to_eps(model_output: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor,
                         prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) z0  =>  eps = sqrt(abar) v + sqrt(1-abar) z
        return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * z
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, v_prediction)")


@contextmanager
def _eval_mode(*modules):
    """Sampling must not run dropout; restore each module's mode afterwards."""
    modules = [m for m in modules if m is not None]
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)


def _as_request(labels, seeds, latent_shape, batch_size: int, num_inference_steps: int, scheduler):
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    seeds = torch.as_tensor(np.asarray(seeds), dtype=torch.long).reshape(-1)
    if len(labels) != len(seeds):
        raise ValueError(f"labels and seeds differ in length ({len(labels)} vs {len(seeds)})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    T = int(scheduler.config.num_train_timesteps)
    if not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must be in 1..{T}, got {num_inference_steps}")
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) != 3:
        raise ValueError(f"latent_shape must be (C, H, W), got {latent_shape}")
    return labels, seeds, shape


def _check_channels(unet, shape) -> None:
    c = getattr(unet.config, "in_channels", None)
    if c is not None and c != shape[0]:
        raise ValueError(f"latent_shape {shape} has {shape[0]} channels but the UNet expects {c}")


def _check_class_range(labels: torch.Tensor, n: int, what: str) -> None:
    bad = labels[(labels < 0) | (labels >= n)]
    if len(bad):
        raise DataError(f"class id {int(bad[0])} is outside 0..{n - 1} ({what})")


def _run_request(chain: Callable, labels, seeds, shape, batch_size, device, steps, progress, desc) -> torch.Tensor:
    """Split the request into batches; each image gets its own generator (initial latent
    drawn from it first, then the chain draws its step noise from it)."""
    n = len(labels)
    out = torch.empty((n, *shape))
    bar = tqdm(total=-(-n // batch_size) * steps, disable=not progress, desc=desc)
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[sl]]
        z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        out[sl] = chain(z, labels[sl].to(device), gens, bar).float().cpu()
    bar.close()
    return out


def _step_noise(gens, shape, device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def _guidance_desc(guided: bool, guidance_scale: float, interval) -> str:
    if not guided:
        return ""
    return f" s={guidance_scale:g}" + (f" t in [{interval[0]}, {interval[1]}]" if interval is not None else "")


def _check_interval(guidance_interval, scheduler) -> tuple[int, int] | None:
    """None, or (t_low, t_high) as ints with 0 <= t_low <= t_high < num_train_timesteps."""
    if guidance_interval is None:
        return None
    T = int(scheduler.config.num_train_timesteps)
    try:
        lo, hi = (operator.index(v) for v in guidance_interval)  # integers only (a float t is a mistake)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two integer timesteps (t_low, t_high), "
                         f"got {guidance_interval!r}") from None
    if not 0 <= lo <= hi < T:
        raise ValueError(f"guidance_interval must satisfy 0 <= t_low <= t_high < {T}, got {guidance_interval!r}")
    return lo, hi


def _in_interval(t: int, interval: tuple[int, int] | None) -> bool:
    return interval is None or interval[0] <= t <= interval[1]


SAMPLER_METHODS = ("ddim", "ddpm", "dpm_solver")


def _step_scheduler(scheduler, method: str, num_inference_steps: int):
    """The step rule a sampler uses, built from the training scheduler, with its timesteps set
    (they stay on the CPU: they index CPU tables). The guided quantity is epsilon, so every
    step rule receives epsilon."""
    if method == "ddim":
        step = DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon")
    elif method == "ddpm":
        step = DDPMScheduler.from_config(scheduler.config, prediction_type="epsilon", variance_type="fixed_small")
    elif method == "dpm_solver":
        step = DPMSolverMultistepScheduler.from_config(scheduler.config, prediction_type="epsilon",
                                                       algorithm_type="dpmsolver++", solver_order=2)
    else:
        raise ValueError(f"unknown sampler method {method!r} ({', '.join(SAMPLER_METHODS)})")
    step.set_timesteps(num_inference_steps)
    return step


def sampler_timesteps(scheduler, method: str, num_inference_steps: int,
                      guidance_interval: tuple[int, int] | None = None) -> list[int]:
    """The training timesteps sampler `method` (ddim, ddpm, dpm_solver) visits in
    `num_inference_steps` steps, in sampling order (exactly those its UNet is called at);
    with `guidance_interval` only those in [t_low, t_high], the steps it guides."""
    T = int(scheduler.config.num_train_timesteps)
    if not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must be in 1..{T}, got {num_inference_steps}")
    interval = _check_interval(guidance_interval, scheduler)
    return [int(t) for t in _step_scheduler(scheduler, method, num_inference_steps).timesteps.tolist()
            if _in_interval(int(t), interval)]


# ---------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------

@torch.no_grad()
def _ddim_for(scheduler, num_inference_steps: int, eta: float, device):
    """(prediction type, DDIM step rule, alphas_cumprod on `device`) from the training scheduler.
    The guided quantity is epsilon, so the step rule always receives epsilon."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ddim = _step_scheduler(scheduler, "ddim", num_inference_steps)
    return scheduler.config.prediction_type, ddim, ddim.alphas_cumprod.to(device)


def _guided_request(unet, scheduler, labels, seeds, classifier, guidance_scale, num_inference_steps, latent_shape,
                    batch_size, guidance_interval, device, where: str):
    """The checks every classifier-guided sampler makes before any compute: (labels, seeds,
    shape, interval, guided)."""
    labels, seeds, shape = _as_request(labels, seeds, latent_shape, batch_size, num_inference_steps, scheduler)
    _check_channels(unet, shape)
    interval = _check_interval(guidance_interval, scheduler)
    guided = classifier is not None and guidance_scale != 0
    if guidance_scale != 0 and classifier is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a classifier")
    check_placement(where, device, unet=unet, classifier=classifier if guided else None)
    if guided and hasattr(classifier, "num_classes"):
        _check_class_range(labels, classifier.num_classes, "latent classifier classes")
    return labels, seeds, shape, interval, guided


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
    labels, seeds, shape, interval, guided = _guided_request(
        unet, scheduler, labels, seeds, classifier, guidance_scale, num_inference_steps, latent_shape, batch_size,
        guidance_interval, device, "guided_ddim_sample")
    prediction_type, ddim, alphas_cumprod = _ddim_for(scheduler, num_inference_steps, eta, device)

    def chain(z, y, gens, bar):
        for t in ddim.timesteps.tolist():
            t_batch = torch.full((len(z),), t, dtype=torch.long, device=z.device)
            abar = alphas_cumprod[t]
            out = unet(z.to(unet.dtype), t_batch).sample.to(z.dtype)
            eps = _model_output_to_eps(out, z, abar, prediction_type)
            if guided and _in_interval(t, interval):
                grad = classifier_log_prob_grad(classifier, z, t_batch, y)
                eps = eps - guidance_scale * (1 - abar).sqrt() * grad
            noise = _step_noise(gens, z.shape[1:], z.device) if eta > 0 else None
            z = ddim.step(eps, t, z, eta=eta, variance_noise=noise).prev_sample
            bar.update()
        return z

    with _eval_mode(unet, classifier if guided else None):
        return _run_request(chain, labels, seeds, shape, batch_size, device, num_inference_steps, progress,
                            "DDIM" + _guidance_desc(guided, guidance_scale, interval))


@torch.no_grad()
def guided_ddpm_sample(unet, scheduler, labels, seeds, *, classifier=None, guidance_scale: float = 0.0,
                       num_inference_steps: int = 1000, latent_shape, batch_size: int = 64, device: str = "cpu",
                       progress: bool = True, guidance_interval: tuple[int, int] | None = None) -> torch.Tensor:
    """DDPM ancestral samples (posterior variance "fixed_small"); guidance shifts the mean,
    mu + s * Sigma_t * grad log p(y | z_t, t). Fewer steps than training use strided
    timesteps (diffusers' DDPMScheduler.set_timesteps). The per-step noise is drawn
    from each image's generator, only on steps with t > 0 (as DDPMScheduler does).
    `guidance_interval`: as in `guided_ddim_sample`."""
    labels, seeds, shape, interval, guided = _guided_request(
        unet, scheduler, labels, seeds, classifier, guidance_scale, num_inference_steps, latent_shape, batch_size,
        guidance_interval, device, "guided_ddpm_sample")
    prediction_type = scheduler.config.prediction_type
    ddpm = _step_scheduler(scheduler, "ddpm", num_inference_steps)
    alphas_cumprod = ddpm.alphas_cumprod.to(device)

    def chain(z, y, gens, bar):
        for t in ddpm.timesteps.tolist():
            t_batch = torch.full((len(z),), t, dtype=torch.long, device=z.device)
            abar = alphas_cumprod[t]
            prev_t = int(ddpm.previous_timestep(t))
            abar_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.ones_like(abar)
            beta = 1 - abar / abar_prev
            variance = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
            out = unet(z.to(unet.dtype), t_batch).sample.to(z.dtype)
            eps = _model_output_to_eps(out, z, abar, prediction_type)
            # the library draws step noise from each generator itself (only when t > 0)
            z_next = ddpm.step(eps, t, z, generator=list(gens) if len(gens) > 1 else gens[0]).prev_sample
            if guided and _in_interval(t, interval):
                grad = classifier_log_prob_grad(classifier, z, t_batch, y)
                z_next = z_next + guidance_scale * variance * grad
            z = z_next
            bar.update()
        return z

    with _eval_mode(unet, classifier if guided else None):
        return _run_request(chain, labels, seeds, shape, batch_size, device, num_inference_steps, progress,
                            "DDPM" + _guidance_desc(guided, guidance_scale, interval))


@torch.no_grad()
def guided_dpm_solver_sample(unet, scheduler, labels, seeds, *, classifier=None, guidance_scale: float = 0.0,
                             num_inference_steps: int = 10, latent_shape, batch_size: int = 64,
                             device: str = "cpu", progress: bool = True,
                             guidance_interval: tuple[int, int] | None = None) -> torch.Tensor:
    """DPM-Solver++ (2nd-order multistep, diffusers' DPMSolverMultistepScheduler) with the same
    classifier guidance on epsilon as `guided_ddim_sample`. Deterministic after the initial
    latent, which comes from each image's generator; a fast sampler for 10-20 steps.
    `guidance_interval`: as in `guided_ddim_sample`."""
    labels, seeds, shape, interval, guided = _guided_request(
        unet, scheduler, labels, seeds, classifier, guidance_scale, num_inference_steps, latent_shape, batch_size,
        guidance_interval, device, "guided_dpm_solver_sample")
    prediction_type = scheduler.config.prediction_type
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    def chain(z, y, gens, bar):
        # the multistep solver keeps past outputs: a fresh one per batch
        dpm = _step_scheduler(scheduler, "dpm_solver", num_inference_steps)
        for t in dpm.timesteps.tolist():
            t_batch = torch.full((len(z),), t, dtype=torch.long, device=z.device)
            abar = alphas_cumprod[t]
            out = unet(z.to(unet.dtype), t_batch).sample.to(z.dtype)
            eps = _model_output_to_eps(out, z, abar, prediction_type)
            if guided and _in_interval(t, interval):
                grad = classifier_log_prob_grad(classifier, z, t_batch, y)
                eps = eps - guidance_scale * (1 - abar).sqrt() * grad
            z = dpm.step(eps, t, z).prev_sample
            bar.update()
        return z

    with _eval_mode(unet, classifier if guided else None):
        return _run_request(chain, labels, seeds, shape, batch_size, device, num_inference_steps, progress,
                            "DPM-Solver++" + _guidance_desc(guided, guidance_scale, interval))


@torch.no_grad()
def cfg_ddim_sample(cond_unet, scheduler, labels, seeds, *, null_label: int, cfg_scale: float,
                    num_inference_steps: int = 50, eta: float = 1.0, latent_shape, batch_size: int = 64,
                    device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """Classifier-free guidance with DDIM: eps = eps_null + w * (eps_y - eps_null), both
    from one forward pass of the class-conditional UNet on the doubled batch.
    w = 1 is the plain conditional model, w = 0 the unconditional (null-label) model."""
    labels, seeds, shape = _as_request(labels, seeds, latent_shape, batch_size, num_inference_steps, scheduler)
    _check_channels(cond_unet, shape)
    n_embeds = getattr(cond_unet.config, "num_class_embeds", None)
    if not n_embeds:
        raise ValueError("cfg_ddim_sample needs a class-conditional UNet (num_class_embeds is not set)")
    if not 0 <= null_label < n_embeds:
        raise ValueError(f"null_label {null_label} is outside the UNet's class ids 0..{n_embeds - 1}")
    _check_class_range(labels, n_embeds, "class-conditional UNet classes")
    check_placement("cfg_ddim_sample", device, cond_unet=cond_unet)
    prediction_type, ddim, alphas_cumprod = _ddim_for(scheduler, num_inference_steps, eta, device)

    def chain(z, y, gens, bar):
        y_both = torch.cat([y, torch.full_like(y, null_label)])
        for t in ddim.timesteps.tolist():
            abar = alphas_cumprod[t]
            z_both = torch.cat([z, z])
            t_batch = torch.full((len(z_both),), t, dtype=torch.long, device=z.device)
            out = cond_unet(z_both.to(cond_unet.dtype), t_batch, class_labels=y_both).sample
            eps_y, eps_null = _model_output_to_eps(out.to(z.dtype), z_both, abar, prediction_type).chunk(2)
            eps = eps_null + cfg_scale * (eps_y - eps_null)
            noise = _step_noise(gens, z.shape[1:], z.device) if eta > 0 else None
            z = ddim.step(eps, t, z, eta=eta, variance_noise=noise).prev_sample
            bar.update()
        return z

    with _eval_mode(cond_unet):
        return _run_request(chain, labels, seeds, shape, batch_size, device, num_inference_steps, progress,
                            f"CFG w={cfg_scale:g}")


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


__all__ = ["classifier_log_prob_grad", "sampler_timesteps", "SAMPLER_METHODS", "guided_ddim_sample", "guided_ddpm_sample", "guided_dpm_solver_sample",
           "cfg_ddim_sample", "shard"]

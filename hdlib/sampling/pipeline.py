"""One guided sampling pipeline for latent diffusion with class control (guided-diffusion's pattern
on diffusers' schedulers): one loop, any step rule (DDIM, DDPM, DPM-Solver++), and guidance passed
in as one `cond_fn` instead of being pasted into each sampler.

    pipe = GuidedLatentPipeline(unet, scheduler)          # the training (forward-process) scheduler
    z = pipe(labels, seeds, method="dpm_solver", num_inference_steps=10,
             cond_fn=ClassifierGuidance(classifier), guidance_scale=10.0, guidance_interval=(300, 999))

Classifier guidance (Dhariwal & Nichol 2021) with `cond_fn(z_t, t, y) = grad log p(y | z_t, t)`:
for DDIM and DPM-Solver++ it corrects epsilon, eps - s * sqrt(1 - abar_t) * grad ("condition the
score"); for DDPM ancestral sampling it shifts the step's mean, mu + s * Sigma_t * grad ("condition
the mean"). `guidance_interval=(t_low, t_high)` guides only the steps whose t lies in it
(Kynkaanniemi et al. 2024). Classifier-free guidance: a class-conditional unet and `cfg_scale`
(eps_null + w * (eps_y - eps_null), one forward on the doubled batch).

Every image draws its initial latent and its step noise from its own CPU generator seeded by its
seed, so an image does not depend on its batch-mates (see hdlib.sampling.samplers for the exact guarantee).
`save_pretrained` / `from_pretrained` write and read the unet and the scheduler (and the vae when one
is given) in diffusers' layout; the latent classifier is passed to each call."""

from __future__ import annotations

import inspect
import operator
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
)
from tqdm import tqdm

from ..errors import DataError
from ..placement import check_placement

SAMPLER_METHODS = ("ddim", "ddpm", "dpm_solver")


# What a step rule takes from the training scheduler: the noise schedule, and its timestep spacing only
# where that was set away from DDPMScheduler's default (else each rule keeps its own default).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
                 "rescale_betas_zero_snr")
SPACING_DEFAULTS = {"timestep_spacing": "leading", "steps_offset": 0}


def step_scheduler(scheduler, method: str, num_inference_steps: int):
    """The step rule `method` built from the training scheduler's noise schedule, its own defaults
    for everything else (DPM-Solver's timestep spacing among them), its timesteps set (on the CPU: they
    index CPU tables). A scheduler read from disk and a fresh one give the same rule (before, a loaded
    scheduler carried DDPM's "leading" spacing into DPM-Solver and a fresh one did not). The guided
    quantity is epsilon, so every step rule receives epsilon."""
    rules = {"ddim": (DDIMScheduler, {}), "ddpm": (DDPMScheduler, {"variance_type": "fixed_small"}),
             "dpm_solver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2})}
    if method not in rules:
        raise ValueError(f"unknown sampler method {method!r} ({', '.join(SAMPLER_METHODS)})")
    cls, extra = rules[method]
    accepted = inspect.signature(cls.__init__).parameters
    schedule = {k: scheduler.config[k] for k in SCHEDULE_KEYS if k in scheduler.config and k in accepted}
    schedule |= {k: scheduler.config[k] for k, default in SPACING_DEFAULTS.items()
                 if scheduler.config.get(k, default) != default and k in accepted}
    step = cls(**schedule, prediction_type="epsilon", **extra)
    step.set_timesteps(num_inference_steps)
    return step


def check_interval(guidance_interval, num_train_timesteps: int) -> tuple[int, int] | None:
    """None, or (t_low, t_high) as ints with 0 <= t_low <= t_high < num_train_timesteps."""
    if guidance_interval is None:
        return None
    try:
        lo, hi = (operator.index(v) for v in guidance_interval)  # integers only (a float t is a mistake)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two integer timesteps (t_low, t_high), "
                         f"got {guidance_interval!r}") from None
    if not 0 <= lo <= hi < num_train_timesteps:
        raise ValueError(f"guidance_interval must satisfy 0 <= t_low <= t_high < {num_train_timesteps}, "
                         f"got {guidance_interval!r}")
    return lo, hi


def in_interval(t: int, interval: tuple[int, int] | None) -> bool:
    return interval is None or interval[0] <= t <= interval[1]


def model_output_to_eps(model_output: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor,
                        prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) z0  =>  eps = sqrt(abar) v + sqrt(1-abar) z
        return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * z
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, v_prediction)")


def classifier_log_prob_grad(classifier: torch.nn.Module, z: torch.Tensor, t: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    """grad_z log p(y | z, t) per sample (the classifier has no batch coupling, so the gradient of
    the summed log-probabilities is the per-sample gradient). Only the classifier is differentiated
    (z is a detached leaf), which keeps guidance cheap."""
    param = next(classifier.parameters(), None)
    dtype = param.dtype if param is not None else z.dtype
    with torch.enable_grad():
        z_in = z.detach().to(dtype).requires_grad_(True)
        log_probs = classifier(z_in, t).log_softmax(dim=-1)
        selected = log_probs.gather(1, labels.view(-1, 1).to(log_probs.device)).sum()
        (grad,) = torch.autograd.grad(selected, z_in)
    return grad.to(z.dtype)


class ClassifierGuidance:
    """cond_fn of a noise-aware latent classifier: (z_t, t, y) -> grad log p(y | z_t, t)."""

    def __init__(self, classifier: torch.nn.Module):
        self.module = classifier

    def __call__(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return classifier_log_prob_grad(self.module, z, t, y)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.module, "num_classes", None)

    def shares_encoder(self, unet: torch.nn.Module) -> bool:
        """Whether the classifier is the sampling U-Net's own frozen encoder plus a head: then one U-Net
        forward gives both the denoiser's output and the classifier's features (`fused`)."""
        is_it = getattr(self.module, "encoder_is", None)
        return bool(is_it is not None and is_it(unet))

    def fused(self, unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """(the U-Net's output, grad log p(y | z_t, t)) from one U-Net forward: its down and middle blocks'
        outputs, caught by hooks, feed the classifier's head, and the gradient flows back through the encoder
        half only. Saves the second encoder forward a guided step otherwise runs (`shares_encoder` first)."""
        levels: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, i, o: levels.append(o[0] if isinstance(o, tuple) else o))
                 for b in [*unet.down_blocks, unet.mid_block]]
        # the decoder half needs no graph: recording it would cost more than the saved encoder pass
        def no_graph(module, inputs):
            torch.set_grad_enabled(False)

        hooks.append(unet.up_blocks[0].register_forward_pre_hook(no_graph))
        try:
            with torch.enable_grad():
                z_in = z.detach().to(unet.dtype).requires_grad_(True)
                out = unet(z_in, t).sample
                torch.set_grad_enabled(True)
                log_probs = self.module.logits_from_levels(levels).log_softmax(dim=-1)
                selected = log_probs.gather(1, y.view(-1, 1).to(log_probs.device)).sum()
                (grad,) = torch.autograd.grad(selected, z_in)
        finally:
            for h in hooks:
                h.remove()
        return out.detach().to(z.dtype), grad.to(z.dtype)


@contextmanager
def eval_mode(*modules):
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


def check_class_range(labels: torch.Tensor, n: int, what: str) -> None:
    bad = labels[(labels < 0) | (labels >= n)]
    if len(bad):
        raise DataError(f"class id {int(bad[0])} is outside 0..{n - 1} ({what})")


def as_request(labels, seeds, latent_shape, batch_size: int, num_inference_steps: int, num_train_timesteps: int):
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    seeds = torch.as_tensor(np.asarray(seeds), dtype=torch.long).reshape(-1)
    if len(labels) != len(seeds):
        raise ValueError(f"labels and seeds differ in length ({len(labels)} vs {len(seeds)})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{num_train_timesteps}, got {num_inference_steps}")
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) != 3:
        raise ValueError(f"latent_shape must be (C, H, W), got {latent_shape}")
    return labels, seeds, shape


def _step_noise(gens, shape, device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


class GuidedLatentPipeline(DiffusionPipeline):
    """unet + the training scheduler (+ optionally the vae that decodes its latents)."""

    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, vae=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    def timesteps(self, method: str, num_inference_steps: int, guidance_interval=None) -> list[int]:
        """The training timesteps `method` visits in sampling order (its unet is called at exactly
        these); with `guidance_interval` only the steps it guides."""
        T = int(self.scheduler.config.num_train_timesteps)
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in 1..{T}, got {num_inference_steps}")
        interval = check_interval(guidance_interval, T)
        return [int(t) for t in step_scheduler(self.scheduler, method, num_inference_steps).timesteps.tolist()
                if in_interval(int(t), interval)]

    def _check(self, labels, seeds, latent_shape, method, num_inference_steps, batch_size, cond_fn,
               guidance_scale, guidance_interval, cfg_scale, device):
        """Every check before any compute: (labels, seeds, shape, interval, guided)."""
        T = int(self.scheduler.config.num_train_timesteps)
        labels, seeds, shape = as_request(labels, seeds, latent_shape, batch_size, num_inference_steps, T)
        if method not in SAMPLER_METHODS:
            raise ValueError(f"unknown sampler method {method!r} ({', '.join(SAMPLER_METHODS)})")
        c = getattr(self.unet.config, "in_channels", None)
        if c is not None and c != shape[0]:
            raise ValueError(f"latent_shape {shape} has {shape[0]} channels but the UNet expects {c}")
        interval = check_interval(guidance_interval, T)
        guided = cond_fn is not None and guidance_scale != 0
        if guidance_scale != 0 and cond_fn is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs a classifier")
        if guided and getattr(cond_fn, "num_classes", None):
            check_class_range(labels, cond_fn.num_classes, "latent classifier classes")
        if cfg_scale is not None:
            n_embeds = getattr(self.unet.config, "num_class_embeds", None)
            if not n_embeds:
                raise ValueError("classifier-free guidance needs a class-conditional UNet (num_class_embeds is not set)")
            check_class_range(labels, n_embeds, "class-conditional UNet classes")
        check_placement(f"{method} sampler", device, unet=self.unet,
                        classifier=getattr(cond_fn, "module", None) if guided else None)
        return labels, seeds, shape, interval, guided

    @torch.no_grad()
    def __call__(self, labels, seeds, *, latent_shape, method: str = "ddim", num_inference_steps: int = 50,
                 eta: float = 1.0, cond_fn: Callable | None = None, guidance_scale: float = 0.0,
                 guidance_interval=None, cfg_scale: float | None = None, null_label: int | None = None,
                 batch_size: int = 64, device=None, progress: bool = True, desc: str = "") -> torch.Tensor:
        """Latents [N, *latent_shape] on the CPU, image i from seeds[i] (class labels[i])."""
        device = torch.device(device) if device is not None else self.unet.device
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        labels, seeds, shape, interval, guided = self._check(
            labels, seeds, latent_shape, method, num_inference_steps, batch_size, cond_fn, guidance_scale,
            guidance_interval, cfg_scale, device)
        if cfg_scale is not None and (null_label is None or not 0 <= null_label < self.unet.config.num_class_embeds):
            raise ValueError(f"null_label {null_label} is outside the UNet's class ids "
                             f"0..{self.unet.config.num_class_embeds - 1}")
        prediction_type = self.scheduler.config.prediction_type
        n = len(labels)
        out = torch.empty((n, *shape))
        bar = tqdm(total=-(-n // batch_size) * num_inference_steps, disable=not progress, desc=desc or method)
        with eval_mode(self.unet, getattr(cond_fn, "module", None) if guided else None):
            for start in range(0, n, batch_size):
                sl = slice(start, start + batch_size)
                gens = [torch.Generator().manual_seed(int(s)) for s in seeds[sl]]
                z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
                out[sl] = self._chain(z, labels[sl].to(device), gens, method, num_inference_steps, eta,
                                      prediction_type, cond_fn if guided else None, guidance_scale, interval,
                                      cfg_scale, null_label, bar).float().cpu()
        bar.close()
        return out

    def _eps(self, z, t, y, abar, prediction_type, cfg_scale, null_label):
        t_batch = torch.full((len(z),), t, dtype=torch.long, device=z.device)
        if cfg_scale is None:
            out = self.unet(z.to(self.unet.dtype), t_batch).sample.to(z.dtype)
            return model_output_to_eps(out, z, abar, prediction_type)
        z_both = torch.cat([z, z])
        y_both = torch.cat([y, torch.full_like(y, null_label)])
        out = self.unet(z_both.to(self.unet.dtype), torch.cat([t_batch, t_batch]), class_labels=y_both).sample
        eps_y, eps_null = model_output_to_eps(out.to(z.dtype), z_both, abar, prediction_type).chunk(2)
        return eps_null + cfg_scale * (eps_y - eps_null)

    def _chain(self, z, y, gens, method, steps, eta, prediction_type, cond_fn, scale, interval, cfg_scale,
               null_label, bar):
        """One batch from pure noise to z_0 (a fresh step rule: DPM-Solver keeps past outputs)."""
        rule = step_scheduler(self.scheduler, method, steps)
        # the unet is told its own training schedule's abar; DDIM and DDPM rebuild the same table
        table = (self.scheduler if method == "dpm_solver" else rule).alphas_cumprod.to(z.device)
        fused = cond_fn is not None and cfg_scale is None and hasattr(cond_fn, "shares_encoder") \
            and cond_fn.shares_encoder(self.unet)
        for t in rule.timesteps.tolist():
            abar = table[t]
            guide = cond_fn is not None and in_interval(t, interval)
            t_batch = torch.full((len(z),), t, dtype=torch.long, device=z.device)
            if guide and fused:  # one U-Net forward serves the denoiser and the classifier
                out, grad = cond_fn.fused(self.unet, z, t_batch, y)
                eps = model_output_to_eps(out, z, abar, prediction_type)
            else:
                eps = self._eps(z, t, y, abar, prediction_type, cfg_scale, null_label)
                if guide:
                    grad = cond_fn(z, t_batch, y)
            if method == "ddpm":
                # the library draws step noise from each generator itself (only when t > 0)
                z_next = rule.step(eps, t, z, generator=list(gens) if len(gens) > 1 else gens[0]).prev_sample
                if guide:  # condition the mean: mu + s * Sigma_t * grad
                    prev_t = int(rule.previous_timestep(t))
                    abar_prev = table[prev_t] if prev_t >= 0 else torch.ones_like(abar)
                    variance = ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=1e-20)
                    z_next = z_next + scale * variance * grad
                z = z_next
            else:
                if guide:  # condition the score: eps - s * sqrt(1 - abar) * grad
                    eps = eps - scale * (1 - abar).sqrt() * grad
                if method == "ddim":
                    noise = _step_noise(gens, z.shape[1:], z.device) if eta > 0 else None
                    z = rule.step(eps, t, z, eta=eta, variance_noise=noise).prev_sample
                else:
                    z = rule.step(eps, t, z).prev_sample
            bar.update()
        return z

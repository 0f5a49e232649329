"""Samplers: agreement with diffusers' loops, guidance gradient, guidance effect,
the reproducibility guarantee (per-image seeding), classifier-free guidance, shards."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline
from diffusers.utils.torch_utils import randn_tensor

from hdlib.errors import DataError
from hdlib.models.diffusion import make_noise_scheduler
from hdlib.sampling.samplers import (
    cfg_ddim_sample,
    classifier_log_prob_grad,
    guided_ddim_sample,
    guided_ddpm_sample,
    guided_dpm_solver_sample,
    sampler_timesteps,
    shard,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (4, 8, 8)
STEPS = 8
SAMPLERS = {"ddim": guided_ddim_sample, "ddpm": guided_ddpm_sample, "dpm_solver": guided_dpm_solver_sample}

# Guarantee (b) of hdlib.sampling: another batch size, order, set of batch-mates or
# sharding changes an image only by float rounding, because the CPU conv/matmul kernels
# (oneDNN, BLAS) are not batch-invariant. Measured: about 4e-7 of the sample scale after
# 8 guided steps of these tiny models (2e-5 absolute on samples of magnitude ~70). We
# allow 1e-4 of the scale (1e-4 absolute for unit-scale latents): 250x the rounding we
# see, so other CPUs / BLAS builds pass, yet ~1e4 times smaller than the difference a
# wrong seed-to-image assignment or shared noise makes (the scale itself).
BATCH_TOLERANCE = 1e-4


def assert_same_images(actual, expected):
    """Equal up to guarantee (b)'s tolerance: |actual - expected| <= 1e-4 * max(1, max|expected|)."""
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=BATCH_TOLERANCE * scale)


class MeanSignClassifier(torch.nn.Module):
    """Hand-made 2-class classifier: class 0 <=> positive mean of channel 0 (ignores t)."""

    num_classes = 2

    def __init__(self, gain=2.0):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(gain), requires_grad=False)

    def forward(self, z, t):
        m = z[:, 0].mean(dim=(1, 2))
        return torch.stack([self.gain * m, -self.gain * m], dim=1)


SEEDS = torch.arange(100, 107)
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0])


def reference_ddim_loop(unet, scheduler, seeds, steps, eta):
    """DDIMPipeline.__call__'s loop without its final clamp to [0, 1]."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    z = randn_tensor((len(seeds), *SHAPE), generator=gens)
    ddim.set_timesteps(steps)
    with torch.no_grad():
        for t in ddim.timesteps:
            z = ddim.step(unet(z, t).sample, t, z, eta=eta, generator=gens).prev_sample
    return z


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unguided_ddim_matches_diffusers(eta, prediction_type, tiny_unet):
    unet, sched = tiny_unet(), make_noise_scheduler("paper", prediction_type=prediction_type)
    ours = guided_ddim_sample(unet, sched, LABELS, SEEDS, guidance_scale=0.0, num_inference_steps=STEPS, eta=eta,
                              latent_shape=SHAPE, batch_size=len(SEEDS), progress=False)
    ref = reference_ddim_loop(unet, sched, SEEDS, STEPS, eta)  # same batch size: bit-identical expected
    # v-prediction goes through our v -> eps conversion, so float rounding differs slightly
    tol = 0.0 if prediction_type == "epsilon" else 1e-5 * float(ref.abs().max())
    assert (ours - ref).abs().max() <= tol
    # and the reference loop is the pipeline's (the pipeline clamps its output to [0, 1])
    pipe = DDIMPipeline(unet, sched)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(int(s)) for s in SEEDS], eta=eta,
                  num_inference_steps=STEPS, output_type="pt").images
    assert torch.equal(images, (ref / 2 + 0.5).clamp(0, 1))
    assert images.std() > 0.1 and not torch.equal(ours, reference_ddim_loop(unet, sched, SEEDS + 1, STEPS, eta))


def test_unguided_ddpm_matches_ddpm_pipeline(tiny_unet):
    unet, sched = tiny_unet(), make_noise_scheduler("paper")
    ours = guided_ddpm_sample(unet, sched, LABELS, SEEDS, num_inference_steps=STEPS, latent_shape=SHAPE, batch_size=7,
                              progress=False)
    pipe = DDPMPipeline(unet, sched)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(int(s)) for s in SEEDS],
                  num_inference_steps=STEPS, output_type="np").images  # [B, H, W, C] in [0, 1]
    ours_01 = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    inside = (ours_01 > 0) & (ours_01 < 1)
    assert inside.sum() > 20  # enough unclamped values for the comparison to mean something
    np.testing.assert_allclose(images, ours_01, rtol=0, atol=1e-6)


def test_unguided_dpm_solver_matches_the_diffusers_scheduler_loop(tiny_unet):
    from diffusers import DPMSolverMultistepScheduler

    unet, sched = tiny_unet(), make_noise_scheduler("paper")
    out = guided_dpm_solver_sample(unet, sched, torch.zeros(3, dtype=torch.long), SEEDS[:3],
                                   num_inference_steps=STEPS, latent_shape=SHAPE, batch_size=3, progress=False)
    dpm = DPMSolverMultistepScheduler.from_config(sched.config, algorithm_type="dpmsolver++", solver_order=2)
    dpm.set_timesteps(STEPS)
    z = randn_tensor((3, *SHAPE), generator=[torch.Generator().manual_seed(int(s)) for s in SEEDS[:3]])
    with torch.no_grad():
        for t in dpm.timesteps:
            z = dpm.step(unet(z, t).sample, t, z).prev_sample
    torch.testing.assert_close(out, z, rtol=1e-5, atol=1e-5)


def test_guidance_gradient_matches_finite_differences(tiny_classifier):
    clf = tiny_classifier().double()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.tensor([150, 700])
    labels = torch.tensor([2, 0])
    grad = classifier_log_prob_grad(clf, z, t, labels)
    assert grad.dtype == torch.float64 and grad.shape == z.shape

    def log_p(zz, i):
        with torch.no_grad():
            return clf(zz, t[i].expand(len(zz))).log_softmax(-1)[:, labels[i]]

    h = 1e-5
    coords = torch.randperm(z[0].numel(), generator=g)[:40]
    for i in range(2):
        base = z[i].reshape(1, -1).repeat(len(coords), 1)
        plus, minus = base.clone(), base.clone()
        plus[torch.arange(len(coords)), coords] += h
        minus[torch.arange(len(coords)), coords] -= h
        fd = (log_p(plus.view(-1, *SHAPE), i) - log_p(minus.view(-1, *SHAPE), i)) / (2 * h)
        analytic = grad[i].reshape(-1)[coords]
        assert analytic.abs().max() > 1e-4  # the check is not vacuous
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-8)


def test_guided_ddim_applies_the_epsilon_shift(tiny_unet, tiny_classifier):
    """One DDIM step from t=999 to x0 ("trailing" spacing), eta=0: the result must be
    (z - sqrt(1-abar) * eps_hat) / sqrt(abar) with eps_hat = eps - s sqrt(1-abar) grad."""
    from diffusers import DDPMScheduler

    unet, clf = tiny_unet(), tiny_classifier()
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0155, clip_sample=False,
                          timestep_spacing="trailing")
    labels, seeds, s = torch.tensor([0, 2]), torch.tensor([5, 6]), 30.0
    out = guided_ddim_sample(unet, sched, labels, seeds, classifier=clf, guidance_scale=s, num_inference_steps=1,
                             eta=0.0, latent_shape=SHAPE, batch_size=2, progress=False)
    z = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(i))) for i in seeds])
    t = torch.full((2,), 999)
    abar = sched.alphas_cumprod[999]
    with torch.no_grad():
        eps = unet(z, t).sample
    grad = classifier_log_prob_grad(clf, z, t, labels)
    expected = (z - (1 - abar).sqrt() * (eps - s * (1 - abar).sqrt() * grad)) / abar.sqrt()
    unguided = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert (expected - unguided).abs().max() > 1e-2  # the shift is visible
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _mean_log_p(clf, z, labels):
    with torch.no_grad():
        return clf(z, torch.zeros(len(z), dtype=torch.long)).log_softmax(-1).gather(1, labels[:, None]).mean().item()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver"])
def test_guidance_raises_class_log_probability(sampler, tiny_unet):
    unet, sched, clf = tiny_unet(), make_noise_scheduler("paper"), MeanSignClassifier()
    labels = torch.tensor([0, 1] * 4)
    seeds = torch.arange(8)
    fn = SAMPLERS[sampler]
    kw = dict(num_inference_steps=STEPS, latent_shape=SHAPE, batch_size=8, progress=False)
    if sampler == "ddim":
        kw["eta"] = 1.0
    plain = fn(unet, sched, labels, seeds, **kw)
    guided = fn(unet, sched, labels, seeds, classifier=clf, guidance_scale=5.0, **kw)
    assert _mean_log_p(clf, guided, labels) > _mean_log_p(clf, plain, labels) + 0.5


def _guided_kw(sampler, clf):
    kw = dict(classifier=clf, guidance_scale=5.0, num_inference_steps=STEPS, latent_shape=SHAPE, progress=False)
    return {**kw, "eta": 1.0} if sampler == "ddim" else kw


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver"])
def test_same_request_and_batch_size_is_bit_identical(sampler, tiny_unet, tiny_classifier):
    """Guarantee (a): the same request with the same batch size gives the same bits."""
    unet, sched, clf, fn = tiny_unet(), make_noise_scheduler("paper"), tiny_classifier(), SAMPLERS[sampler]
    kw = _guided_kw(sampler, clf)
    first = fn(unet, sched, LABELS, SEEDS, batch_size=3, **kw)  # batches of 3, 3, 1
    assert torch.equal(first, fn(unet, sched, LABELS, SEEDS, batch_size=3, **kw))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver"])
def test_batch_composition_changes_images_only_by_rounding(sampler, tiny_unet, tiny_classifier):
    """Guarantee (b): batch size, order, batch-mates and sharding change nothing but rounding."""
    unet, sched, clf, fn = tiny_unet(), make_noise_scheduler("paper"), tiny_classifier(), SAMPLERS[sampler]
    kw = _guided_kw(sampler, clf)
    full = fn(unet, sched, LABELS, SEEDS, batch_size=7, **kw)
    for batch_size in (1, 3):
        assert_same_images(fn(unet, sched, LABELS, SEEDS, batch_size=batch_size, **kw), full)
    order = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    shuffled = fn(unet, sched, LABELS[order], SEEDS[order], batch_size=4, **kw)
    assert_same_images(shuffled[torch.argsort(order)], full)
    # other batch-mates: images 0 and 1 next to requests that are not in `full` at all
    mates = fn(unet, sched, torch.tensor([0, 2, 1, 1]), torch.tensor([100, 900, 101, 901]), batch_size=4, **kw)
    assert_same_images(mates[[0, 2]], full[:2])
    # a request sharded over 3 "devices", each with its own batch size
    parts = [fn(unet, sched, LABELS[list(idx)], SEEDS[list(idx)], batch_size=b, **kw)
             for idx, b in zip((shard(7, r, 3) for r in range(3)), (2, 1, 4))]
    assert_same_images(torch.cat(parts), full)
    # the tolerance is far below what another seed changes
    other_seed = fn(unet, sched, LABELS[:1], SEEDS[:1] + 50, batch_size=1, **kw)
    assert (other_seed - full[:1]).abs().max() > 1e3 * BATCH_TOLERANCE * max(1.0, float(full.detach().abs().max()))


def test_cfg_scale_zero_is_the_null_label_model_and_one_the_conditional(tiny_unet):
    K = 3
    cond_unet, sched = tiny_unet(num_class_embeds=K + 1), make_noise_scheduler("paper")

    class FixedLabel(torch.nn.Module):
        def __init__(self, unet, label):
            super().__init__()
            self.unet, self.label, self.config, self.dtype = unet, label, unet.config, unet.dtype

        def forward(self, z, t, class_labels=None):
            return self.unet(z, t, class_labels=torch.full((len(z),), self.label))

    kw = dict(num_inference_steps=STEPS, eta=1.0, latent_shape=SHAPE, batch_size=7, progress=False)
    w0 = cfg_ddim_sample(cond_unet, sched, LABELS, SEEDS, null_label=K, cfg_scale=0.0, **kw)
    null_path = guided_ddim_sample(FixedLabel(cond_unet, K), sched, LABELS, SEEDS, **kw)
    # one forward on the doubled batch vs a batch of 7: guarantee (b), equal to rounding only
    assert_same_images(w0, null_path)
    # w = 1 is the conditional model: compare class 1 requests with a fixed-label-1 path
    idx = LABELS == 1
    w1 = cfg_ddim_sample(cond_unet, sched, LABELS[idx], SEEDS[idx], null_label=K, cfg_scale=1.0, **kw)
    cond_path = guided_ddim_sample(FixedLabel(cond_unet, 1), sched, LABELS[idx], SEEDS[idx], **kw)
    assert_same_images(w1, cond_path)
    assert (w0[idx] - w1).abs().max() > 1e-3  # the label matters, so the two checks are distinct
    w3 = cfg_ddim_sample(cond_unet, sched, LABELS, SEEDS, null_label=K, cfg_scale=3.0, **kw)
    assert torch.equal(w3, cfg_ddim_sample(cond_unet, sched, LABELS, SEEDS, null_label=K, cfg_scale=3.0, **kw))


def test_sampler_input_errors(tiny_unet, tiny_classifier):
    unet, sched = tiny_unet(), make_noise_scheduler("paper")
    kw = dict(num_inference_steps=2, latent_shape=SHAPE, progress=False)
    with pytest.raises(ValueError, match="differ in length"):
        guided_ddim_sample(unet, sched, LABELS, SEEDS[:3], **kw)
    with pytest.raises(ValueError, match="needs a classifier"):
        guided_ddim_sample(unet, sched, LABELS, SEEDS, guidance_scale=2.0, **kw)
    with pytest.raises(DataError, match="class id 5"):
        guided_ddpm_sample(unet, sched, torch.tensor([0, 5]), torch.tensor([1, 2]), classifier=tiny_classifier(),
                           guidance_scale=1.0, **kw)
    with pytest.raises(ValueError, match="channels"):
        guided_ddim_sample(unet, sched, LABELS, SEEDS, num_inference_steps=2, latent_shape=(3, 8, 8), progress=False)
    with pytest.raises(ValueError, match="class-conditional"):
        cfg_ddim_sample(unet, sched, LABELS, SEEDS, null_label=3, cfg_scale=1.0, **kw)
    with pytest.raises(ValueError, match="null_label 9"):
        cfg_ddim_sample(tiny_unet(num_class_embeds=4), sched, LABELS, SEEDS, null_label=9, cfg_scale=1.0, **kw)


def test_shard_is_contiguous_and_complete():
    for n, world in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        parts = [shard(n, r, world) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert list(shard(10, 0, 3)) == [0, 1, 2, 3] and list(shard(10, 2, 3)) == [7, 8, 9]
    with pytest.raises(ValueError, match="rank 3"):
        shard(10, 3, 3)


def test_samplers_build_no_autograd_graph_even_for_a_trainable_unet(tiny_unet, tiny_classifier):
    """A user's UNet straight from from_pretrained has requires_grad=True; sampling must not
    record a graph over every step (memory grows with the step count), guided or not."""
    unet, sched, clf = tiny_unet(), make_noise_scheduler("paper"), tiny_classifier()
    unet.requires_grad_(True)
    for name, fn in SAMPLERS.items():
        for kw in ({}, {"classifier": clf, "guidance_scale": 2.0}):
            out = fn(unet, sched, LABELS[:2], SEEDS[:2], num_inference_steps=3, latent_shape=SHAPE, progress=False, **kw)
            assert not out.requires_grad and out.grad_fn is None, name


# ---------------------------------------------------------------------------
# guidance interval (Kynkaanniemi et al. 2024) and the timesteps a sampler visits
# ---------------------------------------------------------------------------

class TimestepSpy(torch.nn.Module):
    """Wraps a module and records the (single) timestep of every call."""

    def __init__(self, module):
        super().__init__()
        self.module, self.seen = module, []
        self.config, self.dtype = getattr(module, "config", None), getattr(module, "dtype", torch.float32)
        self.num_classes = getattr(module, "num_classes", None)

    def forward(self, z, t, **kw):
        self.seen.append(int(torch.as_tensor(t).reshape(-1)[0]))
        return self.module(z, t, **kw)


def _interval_kw(sampler):
    kw = dict(num_inference_steps=STEPS, latent_shape=SHAPE, batch_size=4, progress=False)
    return {**kw, "eta": 1.0} if sampler == "ddim" else kw


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver"])
def test_sampler_timesteps_are_the_timesteps_the_sampler_visits(sampler, tiny_unet):
    unet, sched = TimestepSpy(tiny_unet()), make_noise_scheduler("paper")
    clf = TimestepSpy(MeanSignClassifier())
    SAMPLERS[sampler](unet, sched, LABELS[:2] % 2, SEEDS[:2], **_interval_kw(sampler))
    visited = sampler_timesteps(sched, sampler, STEPS)
    assert unet.seen == visited and len(visited) == STEPS and len(set(visited)) == STEPS
    # with an interval, the guided steps (the classifier's calls) are exactly the visited t inside it
    lo, hi = sorted(visited)[2], sorted(visited)[5]
    unet.seen.clear()
    SAMPLERS[sampler](unet, sched, LABELS[:2] % 2, SEEDS[:2], classifier=clf, guidance_scale=5.0,
                      guidance_interval=(lo, hi), **_interval_kw(sampler))
    assert unet.seen == visited
    assert clf.seen == sampler_timesteps(sched, sampler, STEPS, (lo, hi)) == [t for t in visited if lo <= t <= hi]
    assert len(clf.seen) == 4


class MustNotBeCalled(MeanSignClassifier):
    def forward(self, z, t):
        raise AssertionError(f"classifier called at t={t.tolist()} outside the guidance interval")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver"])
def test_guidance_outside_the_interval_is_not_applied(sampler, tiny_unet):
    """A classifier whose gradient changes the samples: an interval that excludes every visited t
    gives bit-identical unguided samples (and never calls the classifier); one that holds every
    visited t gives bit-identical fully guided samples; one that holds some changes them."""
    unet, sched, fn = tiny_unet(), make_noise_scheduler("paper"), SAMPLERS[sampler]
    labels, seeds, kw = torch.tensor([0, 1, 0, 1]), SEEDS[:4], _interval_kw(sampler)
    visited = sorted(sampler_timesteps(sched, sampler, STEPS))
    plain = fn(unet, sched, labels, seeds, **kw)
    guided = fn(unet, sched, labels, seeds, classifier=MeanSignClassifier(), guidance_scale=5.0, **kw)
    assert (guided - plain).abs().max() > 1e-2  # the classifier does change the samples

    gap = (visited[0] + 1, visited[1] - 1)  # between two visited timesteps: holds none of them
    assert not sampler_timesteps(sched, sampler, STEPS, gap)
    for clf in (MeanSignClassifier(), MustNotBeCalled()):
        outside = fn(unet, sched, labels, seeds, classifier=clf, guidance_scale=5.0, guidance_interval=gap, **kw)
        assert torch.equal(outside, plain)
    everywhere = fn(unet, sched, labels, seeds, classifier=MeanSignClassifier(), guidance_scale=5.0,
                    guidance_interval=(visited[0], visited[-1]), **kw)
    assert torch.equal(everywhere, guided)
    high = fn(unet, sched, labels, seeds, classifier=MeanSignClassifier(), guidance_scale=5.0,
              guidance_interval=(visited[len(visited) // 2], 999), **kw)
    assert (high - plain).abs().max() > 1e-3 and (high - guided).abs().max() > 1e-3
    assert _mean_log_p(MeanSignClassifier(), high, labels) > _mean_log_p(MeanSignClassifier(), plain, labels)


def test_guidance_interval_is_checked(tiny_unet):
    unet, sched = tiny_unet(), make_noise_scheduler("paper")
    kw = dict(classifier=MeanSignClassifier(), guidance_scale=1.0, num_inference_steps=2, latent_shape=SHAPE,
              progress=False)
    for bad in [(500, 100), (-1, 10), (0, 1000), (1, 2, 3), (0.5, 10), "ab"]:
        with pytest.raises(ValueError, match="guidance_interval"):
            guided_ddim_sample(unet, sched, LABELS[:1], SEEDS[:1], guidance_interval=bad, **kw)
    with pytest.raises(ValueError, match="unknown sampler method"):
        sampler_timesteps(sched, "euler", 10)
    # the default study's sampler: DPM-Solver++ in 10 steps visits t = 999 ... 100
    assert sampler_timesteps(sched, "dpm_solver", 10) == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert sampler_timesteps(sched, "dpm_solver", 10, (0, 500)) == [500, 400, 300, 200, 100]

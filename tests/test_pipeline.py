"""The one guided pipeline: any step rule with one cond_fn, the interval, save/load round trip."""

import pytest
import torch

from hdlib.models.diffusion import make_noise_scheduler
from hdlib.sampling.pipeline import SAMPLER_METHODS, GuidedLatentPipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SCHED = make_noise_scheduler("paper")
KW = dict(latent_shape=(4, 8, 8), num_inference_steps=4, progress=False)


@pytest.mark.parametrize("method", SAMPLER_METHODS)
def test_a_zero_cond_fn_is_the_unguided_sampler(tiny_unet, method):
    pipe = GuidedLatentPipeline(tiny_unet(), SCHED)
    plain = pipe([0, 1, 2], [5, 6, 7], method=method, **KW)
    zero = pipe([0, 1, 2], [5, 6, 7], method=method, cond_fn=lambda z, t, y: torch.zeros_like(z),
                guidance_scale=4.0, **KW)
    assert torch.equal(plain, zero)
    pushed = pipe([0, 1, 2], [5, 6, 7], method=method, cond_fn=lambda z, t, y: torch.ones_like(z),
                  guidance_scale=4.0, **KW)
    assert not torch.allclose(plain, pushed)


@pytest.mark.parametrize("method", SAMPLER_METHODS)
def test_cond_fn_is_called_only_inside_the_interval(tiny_unet, method):
    pipe = GuidedLatentPipeline(tiny_unet(), SCHED)
    seen = []

    def cond_fn(z, t, y):
        seen.append(int(t[0]))
        return torch.zeros_like(z)

    pipe([0], [1], method=method, cond_fn=cond_fn, guidance_scale=1.0, guidance_interval=(500, 999), **KW)
    visited = pipe.timesteps(method, 4)
    assert seen == [t for t in visited if 500 <= t <= 999] and seen and len(seen) < len(visited)


def test_save_and_load_give_the_same_samples(tiny_unet, tmp_path):
    pipe = GuidedLatentPipeline(tiny_unet(), SCHED)
    before = pipe([3, 4], [9, 10], method="dpm_solver", **KW)
    pipe.save_pretrained(tmp_path / "pipe")
    again = GuidedLatentPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(again([3, 4], [9, 10], method="dpm_solver", **KW), before)


def test_classifier_free_guidance_needs_a_conditional_unet(tiny_unet):
    with pytest.raises(ValueError, match="class-conditional"):
        GuidedLatentPipeline(tiny_unet(), SCHED)([0], [1], cfg_scale=2.0, null_label=3, **KW)
    cond = GuidedLatentPipeline(tiny_unet(num_class_embeds=4), SCHED)
    w1 = cond([0, 1], [1, 2], cfg_scale=1.0, null_label=3, **KW)
    w0 = cond([3, 3], [1, 2], cfg_scale=1.0, null_label=3, **KW)  # the null label is the unconditional model
    assert not torch.allclose(w1, w0) and w1.shape == (2, 4, 8, 8)

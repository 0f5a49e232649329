"""Device placement, checked on the CPU: entry points refuse a module left on another device, and
stage code moves what it loads to the study's device. A `meta` device stands in for a GPU: a module
that is not moved stays on the CPU, and the entry point's check names it."""

import pytest
import torch

from hdlib import sampling
from hdlib.config import load_config
from hdlib.diffusion import make_noise_scheduler
from hdlib.models import build_latent_classifier, build_unet
from hdlib.placement import DevicePlacementError, check_placement, same_device

SMOKE = load_config("params/smoke.yaml")


def _unet():
    return build_unet(SMOKE.diffusion, 4, 8).eval()


def _check_only_sampler(calls):
    """A sampler that makes the real samplers' pre-compute checks (placement included) and returns zeros."""
    def sampler(unet, scheduler, labels, seeds, *, latent_shape, device, classifier=None, guidance_scale=0.0,
                num_inference_steps=4, batch_size=64, guidance_interval=None, **_):
        sampling._guided_request(unet, scheduler, labels, seeds, classifier, guidance_scale, num_inference_steps,
                                 latent_shape, batch_size, guidance_interval, device, "check-only sampler")
        calls.append(device)
        return torch.zeros(len(labels), *latent_shape)
    return sampler


def test_same_device_treats_a_missing_index_as_any():
    assert same_device("cuda", "cuda:0") and same_device("cpu", torch.device("cpu"))
    assert not same_device("cuda:0", "cuda:1") and not same_device("cpu", "meta")


def test_sampler_refuses_a_classifier_left_on_the_cpu():
    # what tests/test_gpu.py used to do: the U-Net on the device, the latent classifier not
    unet = _unet().to("meta")
    clf = build_latent_classifier(SMOKE.latent_classifier, 4, 8, 9, encoder_unet=_unet()).eval()
    with pytest.raises(DevicePlacementError, match="classifier is on cpu but this runs on meta"):
        sampling.guided_ddim_sample(unet, make_noise_scheduler("paper"), [0], [1], classifier=clf, guidance_scale=3.0,
                                    num_inference_steps=2, latent_shape=(4, 8, 8), device="meta", progress=False)


@pytest.mark.parametrize("method", ["guided_ddim_sample", "guided_ddpm_sample", "guided_dpm_solver_sample"])
def test_every_sampler_checks_the_unet(method):
    with pytest.raises(DevicePlacementError, match="unet is on cpu"):
        getattr(sampling, method)(_unet(), make_noise_scheduler("paper"), [0], [1], num_inference_steps=2,
                                  latent_shape=(4, 8, 8), device="meta", progress=False)


def test_unguided_sampling_ignores_an_unused_classifier():
    check_placement("x", "meta", unet=_unet().to("meta"), classifier=None)


def test_stage02_moves_the_denoiser_to_the_study_device(monkeypatch):
    """Stage 02's sample comparison loaded the denoiser on the CPU and sampled on the study's device:
    on a GPU the first U-Net call failed with a device mismatch, right after pre-training."""
    from hdlib.stages import diffusion as stage

    calls = []
    monkeypatch.setattr(stage, "device", lambda cfg: "meta")
    monkeypatch.setattr(stage, "load_autoencoder", lambda cfg: None)
    monkeypatch.setattr(stage, "noise_scheduler", lambda cfg: make_noise_scheduler("paper"))
    monkeypatch.setattr(stage, "latent_scale", lambda cfg: 1.0)
    monkeypatch.setattr(stage, "latent_shape", lambda cfg: (4, 8, 8))
    monkeypatch.setattr(stage, "request_seeds", lambda cfg, tag, n: list(range(n)))
    monkeypatch.setattr(stage, "load_denoiser", lambda cfg, name: _unet())  # as the real one: on the CPU
    monkeypatch.setattr(stage, "guided_ddim_sample", _check_only_sampler(calls))
    out = stage.unconditional_samples(SMOKE, ["denoiser_pretrained"], 3, "test", decode=False)
    assert calls == ["meta"] and out["denoiser_pretrained"][0].shape == (3, 4, 8, 8)


def test_pretrain_samples_move_the_unet(monkeypatch):
    from hdlib.pretrain import samples

    calls = []
    monkeypatch.setattr(samples, "guided_ddim_sample", _check_only_sampler(calls))
    monkeypatch.setattr(samples, "decode_latents", lambda vae, z, scale, device: z)
    samples.sample_images(_unet(), make_noise_scheduler("paper"), None, 1.0, 2, 2, device="meta")
    assert calls == ["meta"]

"""Guidance with the denoiser's own encoder: when the latent classifier is the sampling U-Net's frozen encoder
plus a head, one U-Net forward gives both the denoiser's output and the classifier's gradient, the same (to
round-off) as the two separate passes; with any other U-Net the pipeline keeps the two passes."""

import torch

from hdlib.models.latent_classifier import PretrainedEncoderClassifier
from hdlib.models.diffusion import make_noise_scheduler
from hdlib.sampling.pipeline import ClassifierGuidance, GuidedLatentPipeline, classifier_log_prob_grad


def _classifier(unet, seed=3):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PretrainedEncoderClassifier(unet, num_classes=3, head_width=16).eval()


def test_one_forward_gives_the_denoiser_output_and_the_classifier_gradient(tiny_unet):
    unet = tiny_unet()
    guidance = ClassifierGuidance(_classifier(unet))
    assert guidance.shares_encoder(unet) and not guidance.shares_encoder(tiny_unet(seed=1))
    z, t, y = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((5,), 400), torch.arange(5) % 3
    out, grad = guidance.fused(unet, z, t, y)
    with torch.no_grad():
        expected_out = unet(z, t).sample
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, classifier_log_prob_grad(guidance.module, z, t, y), rtol=1e-4, atol=1e-7)
    assert not z.requires_grad and not any(p.grad is not None for p in unet.parameters())


def test_the_pipeline_samples_the_same_with_one_pass_or_two(tiny_unet):
    unet = tiny_unet()
    pipe = GuidedLatentPipeline(unet, make_noise_scheduler("paper"))
    clf = _classifier(unet)
    kwargs = dict(latent_shape=(4, 8, 8), method="ddim", num_inference_steps=4, guidance_scale=5.0, batch_size=3,
                  progress=False, device="cpu")
    one_pass = pipe([0, 1, 2], [7, 8, 9], cond_fn=ClassifierGuidance(clf), **kwargs)
    two_passes = pipe([0, 1, 2], [7, 8, 9], cond_fn=lambda z, t, y: classifier_log_prob_grad(clf, z, t, y), **kwargs)
    unguided = pipe([0, 1, 2], [7, 8, 9], **{**kwargs, "guidance_scale": 0.0})
    torch.testing.assert_close(one_pass, two_passes, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one_pass, unguided, atol=1e-3)  # guidance did act

"""GPU-only checks (skipped cleanly without CUDA): bf16 training steps and guided
sampling run on the device and agree with the CPU where they should."""

from pathlib import Path

import pytest
import torch

from hdlib.config import load_config
from hdlib.diffusion import diffusion_loss, draw_noise_and_timesteps, make_noise_scheduler
from hdlib.models import build_latent_classifier, build_unet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parent.parent


def test_bf16_denoiser_step_on_gpu():
    cfg = load_config(ROOT / "params/default.yaml")
    unet = build_unet(cfg.diffusion, 4, 16).cuda()
    sched = make_noise_scheduler("paper")
    z = torch.randn(8, 4, 16, 16, device="cuda")
    noise, t = draw_noise_and_timesteps(torch.arange(8), (4, 16, 16), 1000)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = diffusion_loss(unet, z, noise.cuda(), t.cuda(), sched)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)


def test_guided_sampling_gpu_matches_cpu():
    from hdlib.sampling import guided_ddim_sample

    cfg = load_config(ROOT / "params/smoke.yaml")
    torch.manual_seed(0)
    unet = build_unet(cfg.diffusion, 4, 8).eval()
    clf = build_latent_classifier(cfg.latent_classifier, 4, 8, 9).eval()
    sched = make_noise_scheduler("paper")
    kw = dict(classifier=clf, guidance_scale=3.0, num_inference_steps=4, eta=0.0, latent_shape=(4, 8, 8),
              progress=False)
    labels, seeds = torch.tensor([0, 3, 5]), torch.tensor([11, 12, 13])
    cpu = guided_ddim_sample(unet, sched, labels, seeds, device="cpu", **kw)
    gpu = guided_ddim_sample(unet.cuda(), sched, labels, seeds, device="cuda", **kw).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3, rtol=1e-3)

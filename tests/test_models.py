"""Model builders follow the study config; losses and image metrics are right."""

import math
from pathlib import Path

import pytest
import torch

from hdlib.config import load_config
from hdlib.models.builders import (
    autoencoder_downsampling,
    autoencoder_loss,
    build_autoencoder,
    build_unet,
    decode_latents,
    encode_images,
    psnr_ssim,
)

ROOT = Path(__file__).resolve().parent.parent


def test_default_autoencoder_is_f4_with_4_latent_channels():
    cfg = load_config(ROOT / "params/default.yaml")
    vae = build_autoencoder(cfg.autoencoder)
    assert autoencoder_downsampling(cfg.autoencoder) == 4
    imgs = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    z = encode_images(vae, imgs, scale=0.5)
    assert z.shape == (2, 4, 16, 16)
    out = decode_latents(vae, z, scale=0.5)
    assert out.shape == imgs.shape and out.dtype == torch.uint8


def test_paper_autoencoder_shape():
    cfg = load_config(ROOT / "params/nct_crc.yaml")
    vae = build_autoencoder(cfg.autoencoder)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert z.shape == (1, 3, 8, 8)  # f=4, 3 channels: 256x256 -> 64x64x3 at full size
    assert [b.resnets[0].conv1.out_channels for b in vae.encoder.down_blocks] == [128, 256, 512]


def test_unet_conditional_has_null_class():
    cfg = load_config(ROOT / "params/smoke.yaml")
    unet = build_unet(cfg.diffusion, 4, 8, num_classes=9)
    assert unet.class_embedding.num_embeddings == 10
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), class_labels=torch.tensor([0, 9])).sample
    assert out.shape == (2, 4, 8, 8)
    assert build_unet(cfg.diffusion, 4, 8).class_embedding is None


def test_autoencoder_loss_is_split_invariant_and_trains():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "params/smoke.yaml")
    vae = build_autoencoder(cfg.autoencoder)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    seeds = torch.tensor([5, 6, 7, 8])
    full = autoencoder_loss(vae, x, seeds, 1e-6, 0.0)
    halves = (autoencoder_loss(vae, x[:2], seeds[:2], 1e-6, 0.0) + autoencoder_loss(vae, x[2:], seeds[2:], 1e-6, 0.0)) / 2
    assert torch.allclose(full, halves, rtol=1e-4)
    opt = torch.optim.Adam(vae.parameters(), 3e-3)
    first = None
    for _ in range(15):
        loss = autoencoder_loss(vae, x, seeds, 1e-6, 0.2)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_psnr_ssim_hand_values():
    a = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    b = a.clone()
    b[..., ::2, :] += 10  # half the pixels off by 10/255 -> MSE = 0.5 * (10/255)^2
    psnr, ssim = psnr_ssim(a, b)
    assert psnr.item() == pytest.approx(10 * math.log10(1 / (0.5 * (10 / 255) ** 2)), rel=1e-4)
    p2, s2 = psnr_ssim(a, a)
    assert s2.item() == pytest.approx(1.0, abs=1e-4) and p2.item() > 90

"""Model builders: the autoencoder, the latent denoisers and the latent classifier,
each made from the study config (sizes live in params/*.yaml)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DModel
from torchmetrics.functional.image import structural_similarity_index_measure

from ..config import AutoencoderConfig, DiffusionConfig, LatentClassifierConfig
from .latent_classifier import NoiseAwareLatentClassifier, PretrainedEncoderClassifier
from .pretrained import _config, _folder, load_vae, vae_downsampling, vae_like


def build_autoencoder(cfg: AutoencoderConfig, weights: bool = False) -> AutoencoderKL:
    """KL-regularised VAE; downsampling factor 2**(levels - 1) (paper: 3 levels -> f=4). With
    `cfg.init_from`, the architecture of that diffusers VAE, and with `weights` its weights too
    (safetensors only), so that training fine-tunes it."""
    if cfg.init_from:

        return load_vae(cfg.init_from) if weights else vae_like(cfg.init_from)
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
    )


def autoencoder_downsampling(cfg: AutoencoderConfig) -> int:
    if cfg.init_from:

        return vae_downsampling(_config(_folder(cfg.init_from, "vae")))
    return 2 ** (len(cfg.block_out_channels) - 1)


def autoencoder_loss(vae: AutoencoderKL, images: torch.Tensor, generator_seeds: torch.Tensor,
                     kl_weight: float, ssim_weight: float) -> torch.Tensor:
    """L1 + (1 - SSIM) + KL. LPIPS / a patch discriminator need downloaded weights
    or long adversarial training, neither of which fits here; SSIM is the
    structural term we can train without external weights."""
    x = images
    posterior = vae.encode(x).latent_dist
    # Per-sample noise for the reparameterisation, so the loss does not depend
    # on how a batch is split across devices.
    eps = torch.stack([
        torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(int(s)))
        for s in generator_seeds
    ]).to(x.device, posterior.mean.dtype)
    z = posterior.mean + posterior.std * eps
    recon = vae.decode(z).sample
    l1 = (recon - x).abs().mean()
    loss = l1 + kl_weight * posterior.kl().mean()
    if ssim_weight > 0:
        ssim = structural_similarity_index_measure((recon.float() + 1) / 2, (x.float() + 1) / 2, data_range=1.0)
        loss = loss + ssim_weight * (1 - ssim)
    return loss


def build_unet(cfg: DiffusionConfig, in_channels: int, sample_size: int, num_classes: int | None = None) -> UNet2DModel:
    """Latent denoiser. With `num_classes` it is class-conditional for classifier-free
    guidance: class id `num_classes` is the dropped ("null") label."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=(num_classes + 1) if num_classes is not None else None,
    )


def build_latent_classifier(cfg: LatentClassifierConfig, in_channels: int, sample_size: int, num_classes: int,
                            encoder_unet=None):
    """The configured latent classifier; `encoder_unet` (the pre-trained denoiser, whose
    encoder half it reuses frozen) is required by backbone `pretrained_unet`."""

    if cfg.backbone == "pretrained_unet":
        if encoder_unet is None:
            raise ValueError("latent_classifier.backbone=pretrained_unet needs the pre-trained denoiser")
        if (encoder_unet.config.in_channels, encoder_unet.config.sample_size) != (in_channels, sample_size):
            raise ValueError(f"denoiser latents {encoder_unet.config.in_channels}x{encoder_unet.config.sample_size} "
                             f"differ from the classifier's {in_channels}x{sample_size}")
        return PretrainedEncoderClassifier(encoder_unet, num_classes, cfg.head_width)
    return NoiseAwareLatentClassifier(
        in_channels=in_channels,
        num_classes=num_classes,
        sample_size=sample_size,
        width=cfg.width,
        depth=cfg.depth,
        channel_mult=tuple(cfg.channel_mult),
        attention_resolutions=tuple(cfg.attention_resolutions),
        num_heads=cfg.num_heads,
        norm_num_groups=cfg.norm_num_groups,
    )


def images_to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float [-1,1], the autoencoder's input range."""
    return images_uint8.float() / 127.5 - 1.0


def model_range_to_images(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images_uint8: torch.Tensor, scale: float = 1.0, batch_size: int = 16,
                  device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """Posterior means (deterministic latents), multiplied by the latent scale."""
    from tqdm import tqdm

    vae = vae.to(device).eval()
    if len(images_uint8) == 0:
        return torch.empty((0, vae.config.latent_channels, *(s // 2 ** (len(vae.config.block_out_channels) - 1)
                                                              for s in images_uint8.shape[-2:])))
    out = []
    for i in tqdm(range(0, len(images_uint8), batch_size), disable=not progress, desc="encode"):
        x = images_to_model_range(images_uint8[i:i + batch_size]).to(device)
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out) * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, scale: float = 1.0, batch_size: int = 16,
                   device: str = "cpu") -> torch.Tensor:
    """Scaled latents -> uint8 images (an empty request, e.g. a rank's empty shard, gives none)."""
    vae = vae.to(device).eval()
    if len(latents) == 0:
        size = latents.shape[-1] * 2 ** (len(vae.config.block_out_channels) - 1)
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    out = []
    for i in range(0, len(latents), batch_size):
        z = (latents[i:i + batch_size] / scale).to(device)
        out.append(model_range_to_images(vae.decode(z).sample.float().cpu()))
    return torch.cat(out)


def psnr_ssim(original: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM of uint8 batches."""
    a, b = original.float() / 255, recon.float() / 255
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    psnr = 10 * torch.log10(1.0 / mse)
    ssim = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")
    return psnr, ssim


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "build_autoencoder", "autoencoder_loss", "autoencoder_downsampling", "build_unet", "build_latent_classifier",
    "images_to_model_range", "model_range_to_images", "encode_images", "decode_latents", "psnr_ssim",
    "count_parameters",
]

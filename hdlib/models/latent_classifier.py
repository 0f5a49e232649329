"""Noise-aware latent classifier p(y | z_t, t) for classifier guidance.

Shape of guided-diffusion's EncoderUNet (Dhariwal & Nichol 2021): input conv,
per level `depth` time-conditioned residual blocks (optionally followed by
self-attention), downsampling between levels, then attention pooling and a
linear head. guided-diffusion's middle res/attn/res block is optional
(`middle_block=True`): off by default to keep the guidance gradient cheap.
Built from diffusers blocks.

It is trained on noised latents z_t at uniformly random t and conditioned on t
(`classifier_loss`). The authors' release trained on clean latents (t = 0) only
but queried the classifier at every t while sampling; that is what this fixes.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D

from ..errors import DataError


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the spatial mean is the query token; it attends
    over itself and all spatial tokens (with a learned positional embedding)."""

    def __init__(self, spatial_size: int, channels: int, num_heads: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(spatial_size * spatial_size + 1, channels) / math.sqrt(channels))
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        pooled, _ = self.attention(tokens[:, :1], tokens, tokens, need_weights=False)
        return pooled[:, 0]


def _self_attention(channels: int, num_heads: int, groups: int) -> Attention:
    if channels % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
    return Attention(channels, heads=num_heads, dim_head=channels // num_heads, norm_num_groups=groups,
                     residual_connection=True, bias=True, upcast_softmax=True, eps=1e-6)


class NoiseAwareLatentClassifier(nn.Module):
    """Classifier on noised latents, conditioned on the diffusion timestep.

    `attention_resolutions` are spatial sizes (e.g. 32, 16, 8 for 64x64 latents at which
    a level gets self-attention); `channel_mult` gives one level per entry, with a 2x
    downsampling between consecutive levels."""

    def __init__(self, in_channels: int, num_classes: int, sample_size: int, width: int = 128, depth: int = 2,
                 channel_mult: Sequence[int] = (1, 2, 2), attention_resolutions: Sequence[int] = (),
                 num_heads: int = 4, norm_num_groups: int = 32, middle_block: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if depth < 1 or width < 1 or not channel_mult:
            raise ValueError(f"need depth >= 1, width >= 1 and a non-empty channel_mult (got {depth}, {width}, "
                             f"{tuple(channel_mult)})")
        levels = len(channel_mult)
        if sample_size % 2 ** (levels - 1):
            raise ValueError(f"sample_size {sample_size} is not divisible by 2**{levels - 1} "
                             f"(channel_mult has {levels} levels)")
        for m in channel_mult:
            if (width * m) % norm_num_groups:
                raise ValueError(f"norm_num_groups={norm_num_groups} must divide every level width "
                                 f"(width {width} x mult {m} = {width * m})")
        sizes = [sample_size // 2 ** i for i in range(levels)]
        unknown = sorted(set(int(r) for r in attention_resolutions) - set(sizes))
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} are not level sizes {sizes} "
                             f"of a {sample_size}x{sample_size} latent")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.sample_size = sample_size
        temb_dim = 4 * width
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)

        # each entry is (kind, module) so forward knows which blocks take temb
        self.blocks = nn.ModuleList()
        self._kinds: list[str] = []
        ch = width
        for level, mult in enumerate(channel_mult):
            out_ch = width * mult
            for _ in range(depth):
                self._add("res", ResnetBlock2D(in_channels=ch, out_channels=out_ch, temb_channels=temb_dim,
                                               groups=norm_num_groups))
                ch = out_ch
                if sizes[level] in attention_resolutions:
                    self._add("attn", _self_attention(ch, num_heads, norm_num_groups))
            if level < levels - 1:
                self._add("down", Downsample2D(ch, use_conv=True, out_channels=ch, padding=1))
        if middle_block:  # guided-diffusion's res/attn/res at the lowest resolution (~17% more compute)
            self._add("res", ResnetBlock2D(in_channels=ch, out_channels=ch, temb_channels=temb_dim,
                                           groups=norm_num_groups))
            self._add("attn", _self_attention(ch, num_heads, norm_num_groups))
            self._add("res", ResnetBlock2D(in_channels=ch, out_channels=ch, temb_channels=temb_dim,
                                           groups=norm_num_groups))
        self.norm_out = nn.GroupNorm(norm_num_groups, ch, eps=1e-6)
        self.pool = AttentionPool2d(sizes[-1], ch, num_heads)
        self.head = nn.Linear(ch, num_classes)

    def _add(self, kind: str, module: nn.Module) -> None:
        self.blocks.append(module)
        self._kinds.append(kind)

    def forward(self, z_t: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """Logits [B, num_classes] for noised latents z_t [B, C, H, W] at timesteps [B] (or one int)."""
        if z_t.ndim != 4 or z_t.shape[1] != self.in_channels:
            raise ValueError(f"expected latents [B, {self.in_channels}, H, W], got {tuple(z_t.shape)}")
        t = torch.as_tensor(timesteps, device=z_t.device)
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        temb = self.time_embedding(self.time_proj(t).to(z_t.dtype))
        h = self.conv_in(z_t)
        for kind, block in zip(self._kinds, self.blocks):
            h = block(h, temb) if kind == "res" else block(h)
        h = F.silu(self.norm_out(h))
        return self.head(self.pool(h))


class PretrainedEncoderClassifier(nn.Module):
    """p(y | z_t, t) on the frozen encoder half of a pre-trained denoiser (diffusers
    UNet2DModel: conv_in, time embedding, down blocks, middle block), each level's output
    pooled to its per-channel mean and standard deviation (texture statistics: tissue classes
    differ in texture more than in layout) and concatenated, then a trained MLP head.

    The denoiser learned noise-aware features of tissue from the whole unlabeled pool, so
    with 8 labels per class this head generalises much better than a classifier trained
    from scratch on those labels (measured: validation accuracy at t < 500 of 0.78 vs 0.64
    on the demo target at 5% labels; mean+std pooling 0.80 vs mean only 0.78). Only the head is trained; guidance differentiates
    through the frozen encoder, which costs about one extra half-UNet pass per step."""

    def __init__(self, unet: nn.Module, num_classes: int, head_width: int = 256):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        cfg = unet.config
        self.in_channels, self.num_classes, self.sample_size = cfg.in_channels, num_classes, cfg.sample_size
        # only the encoder's modules are kept, so the classifier's weights do not hold the decoder half
        self.encoder = nn.ModuleDict({k: getattr(unet, k) for k in
                                      ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block")})
        self.encoder.requires_grad_(False)
        feat = 2 * (sum(b.resnets[-1].out_channels for b in unet.down_blocks) + unet.mid_block.resnets[-1].out_channels)
        self.head = nn.Sequential(nn.LayerNorm(feat), nn.Linear(feat, head_width), nn.SiLU(),
                                  nn.Linear(head_width, num_classes))

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode (dropout, if the denoiser has any)
        return self

    def forward(self, z_t: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        if z_t.ndim != 4 or z_t.shape[1] != self.in_channels:
            raise ValueError(f"expected latents [B, {self.in_channels}, H, W], got {tuple(z_t.shape)}")
        e = self.encoder
        t = torch.as_tensor(timesteps, device=z_t.device)
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        temb = e["time_embedding"](e["time_proj"](t).to(z_t.dtype))
        h = e["conv_in"](z_t)
        levels = []
        for block in e["down_blocks"]:
            h, _ = block(hidden_states=h, temb=temb)
            levels.append(h)
        levels.append(e["mid_block"](h, temb))
        return self.logits_from_levels(levels)

    def logits_from_levels(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """The head on the encoder's level outputs (each down block's, then the middle block's): also what
        guidance calls with the levels of the sampling U-Net's own forward when it is this encoder."""
        feats = [f for h in levels for f in (h.mean((2, 3)), h.flatten(2).std(2))]
        return self.head(torch.cat(feats, 1).float())

    def encoder_is(self, unet: nn.Module) -> bool:
        """Whether `unet`'s encoder half holds exactly this classifier's frozen encoder weights."""
        ours = [p for k in ("conv_in", "time_embedding", "down_blocks", "mid_block") for p in self.encoder[k].parameters()]
        theirs = [p for k in ("conv_in", "time_embedding", "down_blocks", "mid_block")
                  for p in getattr(unet, k).parameters()]
        return len(ours) == len(theirs) and all(
            a is b or (a.shape == b.shape and a.device == b.device and torch.equal(a, b)) for a, b in zip(ours, theirs))


def _num_classes(classifier) -> int | None:
    # also through a DistributedDataParallel / accelerate wrapper (.module)
    return getattr(classifier, "num_classes", None) or getattr(getattr(classifier, "module", None), "num_classes", None)


def _check_labels(labels: torch.Tensor, num_classes: int | None) -> None:
    if num_classes is None:
        return
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"class id {int(bad)} is outside 0..{num_classes - 1}")


def classifier_loss(classifier: NoiseAwareLatentClassifier, z0: torch.Tensor, labels: torch.Tensor,
                    noise: torch.Tensor, timesteps: torch.Tensor, scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on z_t = add_noise(z0, noise, t) at the caller-drawn t, conditioned on t.
    Returns (loss, logits)."""
    if not (len(z0) == len(labels) == len(noise) == len(timesteps)):
        raise ValueError(f"z0, labels, noise and timesteps differ in length "
                         f"({len(z0)}, {len(labels)}, {len(noise)}, {len(timesteps)})")
    _check_labels(labels, _num_classes(classifier))
    z_t = scheduler.add_noise(z0, noise, timesteps)
    logits = classifier(z_t, timesteps)
    return F.cross_entropy(logits.float(), labels), logits


@torch.no_grad()
def accuracy_by_timestep_bucket(classifier: NoiseAwareLatentClassifier, z0: torch.Tensor, labels: torch.Tensor,
                                scheduler, buckets: int = 10, seed: int = 0, batch_size: int = 256) -> pd.DataFrame:
    """Accuracy on noised latents, per equal-width bucket of timesteps [start, end).
    Every latent is evaluated once per bucket, at a t drawn uniformly within the bucket."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(z0) != len(labels) or len(z0) == 0:
        raise DataError(f"need equal, non-zero numbers of latents and labels (got {len(z0)}, {len(labels)})")
    _check_labels(labels, _num_classes(classifier))
    T = int(scheduler.config.num_train_timesteps)
    if not 1 <= buckets <= T:
        raise ValueError(f"buckets must be in 1..{T}, got {buckets}")
    edges = np.linspace(0, T, buckets + 1).round().astype(int)
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    rows = []
    for b in range(buckets):
        start, end = int(edges[b]), int(edges[b + 1])
        g = torch.Generator().manual_seed(int(seed) * 100_003 + b)  # one stream per bucket
        t = torch.randint(start, end, (len(z0),), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        correct = 0
        for i in range(0, len(z0), batch_size):
            sl = slice(i, i + batch_size)
            zt = scheduler.add_noise(z0[sl].float(), noise[sl], t[sl]).to(device)
            pred = classifier(zt, t[sl].to(device)).argmax(-1).cpu()
            correct += int((pred == labels[sl]).sum())
        rows.append({"bucket_start": start, "bucket_end": end, "accuracy": correct / len(z0), "n": len(z0)})
    classifier.train(was_training)
    return pd.DataFrame(rows)


__all__ = ["NoiseAwareLatentClassifier", "PretrainedEncoderClassifier", "AttentionPool2d", "classifier_loss", "accuracy_by_timestep_bucket"]

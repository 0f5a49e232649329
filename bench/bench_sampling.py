"""Sampling throughput (images/s) of unguided DDIM, classifier-guided DDIM and
classifier-free-guidance DDIM, measured in one run on randomly initialised models
of the study's shapes (throughput does not depend on the weights).

    python bench/bench_sampling.py [--size default|paper] [--n 32] [--steps 10] [--device cpu]

default: UNet (32, 64, 64), attention at the middle level, 4x16x16 latents;
         latent classifier width 32, depth 1 (params/default.yaml).
paper:   UNet 192 x (1, 2, 2, 4, 4) on 3x64x64 latents; classifier width 128, depth 2
         (params/nct_crc.yaml). Slow on a CPU.
Prints guided/unguided and cfg/unguided time ratios (the aim: guided <= 1.3x at default size).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hdlib.config import load_config, resolve_device
from hdlib.models.builders import (
    autoencoder_downsampling,
    build_latent_classifier,
    build_unet,
    count_parameters,
)
from hdlib.models.diffusion import make_noise_scheduler
from hdlib.sampling.samplers import cfg_ddim_sample, guided_ddim_sample

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"default": ROOT / "params/default.yaml", "paper": ROOT / "params/nct_crc.yaml"}


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="default", choices=list(PARAMS))
    ap.add_argument("--n", type=int, default=32, help="images per sampler")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: n)")
    ap.add_argument("--guidance-scale", type=float, default=10.0)
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per sampler, interleaved; the fastest counts")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cfg = load_config(PARAMS[args.size])
    C = cfg.autoencoder.latent_channels
    L = cfg.data.image_size // autoencoder_downsampling(cfg.autoencoder)
    K = len(cfg.data.classes)
    torch.manual_seed(0)
    unet = build_unet(cfg.diffusion, C, L).to(device).eval().requires_grad_(False)
    cond_unet = build_unet(cfg.diffusion, C, L, num_classes=K).to(device).eval().requires_grad_(False)
    clf = build_latent_classifier(cfg.latent_classifier, C, L, K).to(device).eval().requires_grad_(False)
    sched = make_noise_scheduler(cfg.diffusion.schedule, cfg.diffusion.num_train_timesteps,
                                 prediction_type=cfg.diffusion.prediction_type)
    labels = torch.arange(args.n) % K
    seeds = torch.arange(args.n)
    common = dict(num_inference_steps=args.steps, eta=1.0, latent_shape=(C, L, L), batch_size=args.batch or args.n,
                  device=device, progress=False)
    runs = {
        "unguided DDIM": lambda: guided_ddim_sample(unet, sched, labels, seeds, **common),
        f"guided DDIM (s={args.guidance_scale:g})": lambda: guided_ddim_sample(
            unet, sched, labels, seeds, classifier=clf, guidance_scale=args.guidance_scale, **common),
        f"CFG DDIM (w={args.cfg_scale:g})": lambda: cfg_ddim_sample(
            cond_unet, sched, labels, seeds, null_label=K, cfg_scale=args.cfg_scale, **common),
    }
    print(f"size {args.size}: latents {C}x{L}x{L}, UNet {count_parameters(unet) / 1e6:.2f} M params, "
          f"classifier {count_parameters(clf) / 1e6:.2f} M params; n {args.n}, steps {args.steps}, "
          f"batch {common['batch_size']}; device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    # warm-up (allocator, kernel selection) on a short run of each sampler
    warm = dict(common, num_inference_steps=1)
    guided_ddim_sample(unet, sched, labels, seeds, classifier=clf, guidance_scale=1.0, **warm)
    cfg_ddim_sample(cond_unet, sched, labels, seeds, null_label=K, cfg_scale=1.0, **warm)
    # interleave the samplers and keep each one's fastest run: other load on a shared
    # machine then inflates all three alike instead of one
    seconds = {name: float("inf") for name in runs}
    for _ in range(max(1, args.repeats)):
        for name, fn in runs.items():
            seconds[name] = min(seconds[name], _timed(fn, device))
    names = list(runs)
    for name in names:
        print(f"{name:24s} {args.n / seconds[name]:9.2f} images/s  ({seconds[name]:.2f} s)")
    base = seconds[names[0]]
    print(f"guided / unguided time: {seconds[names[1]] / base:.2f}x   cfg / unguided time: {seconds[names[2]] / base:.2f}x")


if __name__ == "__main__":
    main()

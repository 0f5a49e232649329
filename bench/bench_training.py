"""Training throughput (images/s) and peak memory of the autoencoder and the latent
denoiser at the default-study and paper sizes; fp32, and bf16 on a GPU.

    python bench/bench_training.py [--sizes default paper] [--steps 5] [--device auto]

Prints figures measured in this run and the paper/default cost ratio. The paper
sizes are slow on a CPU (seconds per step); use --steps 2 there.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from hdlib.config import load_config, resolve_device
from hdlib.models.builders import (
    autoencoder_downsampling,
    autoencoder_loss,
    build_autoencoder,
    build_unet,
)
from hdlib.models.diffusion import (
    diffusion_loss,
    draw_noise_and_timesteps,
    make_noise_scheduler,
)

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"default": ROOT / "params/default.yaml", "paper": ROOT / "params/nct_crc.yaml"}


def _peak_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(step, steps, device):
    step()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench(size: str, steps: int, device: str, dtype, batch: int | None):
    cfg = load_config(PARAMS[size])
    S = cfg.data.image_size
    out = {}
    ae = build_autoencoder(cfg.autoencoder).to(device)
    opt = torch.optim.AdamW(ae.parameters(), 1e-4)
    b = batch or min(cfg.autoencoder.train.batch_size, 8 if size == "paper" else 16)
    x = torch.rand(b, 3, S, S, device=device) * 2 - 1
    seeds = torch.arange(b)

    def ae_step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = autoencoder_loss(ae, x, seeds, 1e-6, 0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dt = _time(ae_step, steps, device)
    out["autoencoder"] = (b / dt, _peak_mb(device), b)
    f = autoencoder_downsampling(cfg.autoencoder)
    C, L = cfg.autoencoder.latent_channels, S // f
    unet = build_unet(cfg.diffusion, C, L).to(device)
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    sched = make_noise_scheduler(cfg.diffusion.schedule)
    b = batch or min(cfg.diffusion.pretrain.batch_size, 8 if size == "paper" else 32)
    z = torch.randn(b, C, L, L, device=device)
    noise, t = draw_noise_and_timesteps(torch.arange(b), (C, L, L), 1000)
    noise, t = noise.to(device), t.to(device)

    def unet_step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = diffusion_loss(unet, z, noise, t, sched, loss_type="l1")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dt = _time(unet_step, steps, device)
    out["denoiser"] = (b / dt, _peak_mb(device), b)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["default"], choices=list(PARAMS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="override the batch size")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if device.startswith("cuda") else [])
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    results = {}
    for size in args.sizes:
        for dname, dt in dtypes:
            r = bench(size, args.steps, device, dt, args.batch)
            for model, (ips, mem, b) in r.items():
                results[(size, dname, model)] = ips
                print(f"{size:8s} {dname:5s} {model:12s} batch {b:3d}: {ips:8.1f} images/s, peak memory {mem:8.0f} MB")
    for dname, _ in dtypes:
        for model in ("autoencoder", "denoiser"):
            if ("paper", dname, model) in results and ("default", dname, model) in results:
                ratio = results[("default", dname, model)] / results[("paper", dname, model)]
                print(f"{model} {dname}: paper size costs {ratio:.1f}x the default size per image")
        if ("default", "bf16", "denoiser") in results:
            print(f"bf16 / fp32 speed-up (default denoiser): "
                  f"{results[('default', 'bf16', 'denoiser')] / results[('default', 'fp32', 'denoiser')]:.2f}x")


if __name__ == "__main__":
    main()

"""Pre-training throughput of the shipped recipe (params/pretrain_demo.yaml: the v4 U-Net on 4x16x16 latents,
batch 64, v-prediction, L2, log-normal noise levels): training steps/s in fp32, bf16 autocast,
channels-last memory format and torch.compile, each in a fresh subprocess of the same run, with the ratio to
fp32 and the CPU named (its model name and whether it has native bf16).

    python bench/bench_pretrain_throughput.py [--steps 5] [--threads 2] [--variants fp32 bf16 ...] [--markdown]

Randomly initialised weights (speed does not depend on them); one untimed warm-up step (compile's is long).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params" / "pretrain_demo.yaml"
VARIANTS = {  # name: (autocast bf16, channels_last, torch.compile)
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "fp32 channels-last": (False, True, False),
    "bf16 channels-last": (True, True, False),
    "fp32 compile": (False, False, True),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def one_variant(name: str, steps: int, threads: int) -> dict:
    """Runs in its own process: builds the recipe's U-Net and times `steps` training steps."""
    import torch

    from hdlib.config import load_config
    from hdlib.models.builders import build_unet
    from hdlib.models.diffusion import diffusion_loss, draw_noise_and_timesteps, make_noise_scheduler

    torch.set_num_threads(threads)
    bf16, channels_last, compiled = VARIANTS[name]
    cfg = load_config(PARAMS)
    d = cfg.diffusion
    torch.manual_seed(0)
    unet = build_unet(d, 4, 16)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    model = torch.compile(unet) if compiled else unet
    opt = torch.optim.AdamW(unet.parameters(), d.pretrain.lr)
    sched = make_noise_scheduler(d.schedule, prediction_type=d.prediction_type)
    b = d.pretrain.batch_size
    z = torch.randn(b, 4, 16, 16)
    noise, t = draw_noise_and_timesteps(torch.arange(b), (4, 16, 16), d.num_train_timesteps)
    if channels_last:
        z, noise = z.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(model, z, noise, t, sched, loss_type=d.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    s_per_step = (time.perf_counter() - t0) / steps
    return {"variant": name, "batch": b, "s_per_step": s_per_step, "steps_per_s": 1 / s_per_step,
            "images_per_s": b / s_per_step, "warmup_s": warm}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_variant(args.one, args.steps, args.threads)))
        return
    from hdlib.training.runtime import cpu_bf16_is_native

    import torch

    rows = []
    for name in args.variants:  # a fresh process each: no variant warms another's caches or compiles
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                              "--threads", str(args.threads)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            rows.append({"variant": name, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    native = cpu_bf16_is_native()
    print(f"shipped pre-training recipe ({PARAMS.relative_to(ROOT)}); CPU: {cpu_name()}, {args.threads} thread(s), "
          f"native bf16: {'yes' if native else 'no' if native is False else 'unknown'}; torch {torch.__version__}; "
          f"1 warm-up + {args.steps} timed steps per row\n")
    fp32 = next((r["s_per_step"] for r in rows if r["variant"] == "fp32" and "s_per_step" in r), None)
    print("| variant | batch | steps/s | images/s | s/step | speed vs fp32 | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | | | | | failed: {r['error']} | |")
            continue
        ratio = f"{fp32 / r['s_per_step']:.2f}x" if fp32 else ""
        print(f"| {r['variant']} | {r['batch']} | {r['steps_per_s']:.3g} | {r['images_per_s']:.3g} | "
              f"{r['s_per_step']:.3g} | {ratio} | {r['warmup_s']:.1f} |")


if __name__ == "__main__":
    main()

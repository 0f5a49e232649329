"""Guided vs unguided sampling time of the shipped recipe: the v4 U-Net (params/pretrain_demo.yaml) with the
default study's latent classifier (params/default.yaml: the denoiser's frozen encoder + a trained head),
through the one GuidedLatentPipeline, for DDIM 25 steps and DPM-Solver++ 10 steps, in fp32 and bf16 autocast.
One run prints every row, the guided/unguided ratio per sampler and precision (the issue's aim: <= 1.3x),
with the classifier's encoder forward run again (two passes) or taken from the U-Net's own forward (one pass),
and the CPU (its name and whether it computes bf16 natively).

    python bench/bench_guided_sampling.py [--n 64] [--repeats 2] [--precisions fp32 bf16] [--threads 2]

Random weights (time does not depend on them). Each setting gets one untimed 1-step warm-up; samplers are
interleaved and each keeps its fastest of `--repeats` runs, so other load inflates all alike.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hdlib.config import load_config
from hdlib.models.builders import build_latent_classifier, build_unet
from hdlib.models.diffusion import make_noise_scheduler
from hdlib.sampling.pipeline import ClassifierGuidance, GuidedLatentPipeline, classifier_log_prob_grad
from hdlib.training.runtime import cpu_bf16_is_native

ROOT = Path(__file__).resolve().parent.parent
SAMPLERS = {"DDIM 25": ("ddim", 25), "DPM-Solver++ 10": ("dpm_solver", 10)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--guidance-scale", type=float, default=10.0)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe, study = load_config(ROOT / "params/pretrain_demo.yaml"), load_config(ROOT / "params/default.yaml")
    K, C, S = len(study.data.classes), 4, 16
    torch.manual_seed(0)
    unet = build_unet(recipe.diffusion, C, S).eval().requires_grad_(False)
    clf = build_latent_classifier(study.latent_classifier, C, S, K, encoder_unet=unet).eval().requires_grad_(False)
    sched = make_noise_scheduler(recipe.diffusion.schedule, prediction_type=recipe.diffusion.prediction_type)
    pipe = GuidedLatentPipeline(unet, sched)
    labels, seeds = torch.arange(args.n) % K, torch.arange(args.n)
    # one pass: the U-Net's own forward feeds the classifier's head (its encoder is the U-Net's);
    # two passes: the classifier runs the encoder again, as it must when the denoiser was adapted
    modes = {"unguided": None, "two passes": lambda z, t, y: classifier_log_prob_grad(clf, z, t, y),
             "one pass": ClassifierGuidance(clf)}

    def run(method, steps, mode, precision):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return pipe(labels, seeds, latent_shape=(C, S, S), method=method, num_inference_steps=steps,
                        cond_fn=modes[mode], guidance_scale=args.guidance_scale if modes[mode] else 0.0,
                        batch_size=args.n, device="cpu", progress=False)

    settings = [(name, precision, mode) for precision in args.precisions for name in SAMPLERS for mode in modes]
    seconds = {s: float("inf") for s in settings}
    for name, precision, mode in settings:  # warm-up: one step each
        run(SAMPLERS[name][0], 1 if SAMPLERS[name][0] == "ddim" else 2, mode, precision)
    for _ in range(max(1, args.repeats)):
        for s in settings:
            name, precision, mode = s
            t0 = time.perf_counter()
            run(*SAMPLERS[name], mode, precision)
            seconds[s] = min(seconds[s], time.perf_counter() - t0)
    native = cpu_bf16_is_native()
    print(f"guided sampling, the shipped recipe (U-Net {recipe.diffusion.block_out_channels}, 4x16x16 latents; "
          f"latent classifier {study.latent_classifier.backbone}); {args.n} images, scale {args.guidance_scale:g}; "
          f"CPU: {cpu_name()}, {args.threads} thread(s), native bf16: "
          f"{'yes' if native else 'no' if native is False else 'unknown'}; torch {torch.__version__}; "
          f"fastest of {args.repeats}\n")
    print("| sampler | precision | unguided s | guided, two passes s | guided, one pass s | two passes / unguided "
          "| one pass / unguided |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for precision in args.precisions:
        for name in SAMPLERS:
            u, two, one = (seconds[(name, precision, m)] for m in modes)
            print(f"| {name} | {precision} | {u:.2f} | {two:.2f} | {one:.2f} | {two / u:.2f}x | {one / u:.2f}x |")


if __name__ == "__main__":
    main()

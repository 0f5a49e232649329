"""Wall time of one default-study downstream grid cell's training, fp32 vs bf16 autocast
(`study.mixed_precision`), real-only and with synthetic images at ratio 1 (twice the images
per step), on one thread as in a grid worker.

    python bench/bench_downstream_cell.py [--steps 30] [--threads 1] [--params params/default.yaml]

Sizes come from the params file: downstream.backbone, downstream.train (batch, schedule) and
the primary label count (8 per class = 6 train + 2 validation). Images are random uint8: the
cost of a step does not depend on the pixels. Prints seconds per training step and the
fp32/bf16 ratio, all from this run. bf16 is only fast on CPUs with native bf16 (e.g.
avx512_bf16 or AMX); elsewhere it may be slower than fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from hdlib.config import load_config
from hdlib.evaluation.downstream import ClassifierOptions, train_classifier

ROOT = Path(__file__).resolve().parent.parent


def cell_seconds_per_step(cfg, steps: int, precision: str, synthetic: bool) -> float:
    k = len(cfg.data.classes)
    g = torch.Generator().manual_seed(0)
    n_train, n_val = 6 * k, 2 * k
    size = cfg.data.image_size
    x = torch.randint(0, 256, (n_train, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n_train) % k
    sx = torch.randint(0, 256, (n_train, 3, size, size), dtype=torch.uint8, generator=g) if synthetic else None
    settings = dataclasses.replace(cfg.downstream.train, max_steps=steps, warmup_steps=min(cfg.downstream.train.warmup_steps, steps))
    options = ClassifierOptions(num_classes=k, backbone=cfg.downstream.backbone, balanced=True, augment=True,
                                eval_every=steps, synthetic_images=sx, synthetic_labels=y if synthetic else None,
                                synthetic_per_real=cfg.downstream.ratio if synthetic else 0.0,
                                mixed_precision=precision, progress=False)
    start = time.perf_counter()
    train_classifier(x, y, x[:n_val], y[:n_val], settings, options)
    return (time.perf_counter() - start) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params/default.yaml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.params)
    cell_seconds_per_step(cfg, 3, "no", False)  # warm-up: imports, allocator
    print(f"{cfg.downstream.backbone}, batch {cfg.downstream.train.batch_size}, {cfg.data.image_size} px, "
          f"{args.steps} steps, {args.threads} thread(s):\n")
    print("| cell | fp32 s/step | bf16 s/step | fp32/bf16 |")
    print("|---|---|---|---|")
    for synthetic in (False, True):
        fp32 = cell_seconds_per_step(cfg, args.steps, "no", synthetic)
        bf16 = cell_seconds_per_step(cfg, args.steps, "bf16", synthetic)
        name = "real + synthetic (ratio %g)" % cfg.downstream.ratio if synthetic else "real only"
        print(f"| {name} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f} |", flush=True)


if __name__ == "__main__":
    main()

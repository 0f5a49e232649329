"""The memory plan of the paper-size study (params/nct_crc.yaml): each network's training-step
memory measured at batch 1 and batch 2 (bench_paper.py's rows, bf16 autocast, one fresh process
per row), the per-image activation memory from their difference, and the micro-batch that
hdlib.training.memory_plan takes for each budget of hdlib.training.memory_plan.BUDGETS_GB (24, 40, 80, 141 GB).

    python bench/bench_memory_plan.py [--device cpu|cuda] [--models ae unet classifier vit] [--markdown]

On the CPU the peak is the process's peak RSS (Python + torch included, which the difference at
two batch sizes cancels); on CUDA torch.cuda.max_memory_allocated. The micro-batches are what
`Trainer.plan_memory` takes on a GPU of that size, up to the difference between this measurement
and the one it makes on the device itself (CPU and GPU kernels keep somewhat different workspaces)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_paper import LABELS, device_name, launch  # noqa: E402

from hdlib.config import load_config  # noqa: E402
from hdlib.training.memory_plan import BUDGETS_GB, StepMemory, plan_micro_batch  # noqa: E402

PARAMS = Path(__file__).resolve().parent.parent / "params" / "nct_crc.yaml"
TRAIN_BATCH = {"ae": ("autoencoder", "train"), "unet": ("diffusion", "pretrain"),
               "classifier": ("latent_classifier", "train"), "vit": ("downstream", "train")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=list(TRAIN_BATCH))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--row-timeout", type=float, default=1200)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(PARAMS)
    print(f"memory plan of {PARAMS.name}; {device_name(args.device, args.threads)}; bf16 autocast; "
          "one training step per row", flush=True)
    header = ["network", "study batch", "peak at 1 (GB)", "peak at 2 (GB)", "per image (GB)", "fixed (GB)"] + \
             [f"micro-batch at {b} GB" for b in BUDGETS_GB]
    rows = []
    for m in args.models:
        peaks = []
        for b in (1, 2):
            spec = {"model": m, "precision": "bf16", "batch": b, "steps": 1, "device": args.device,
                    "compile": False, "channels_last": False, "threads": args.threads}
            r = launch(spec, args.row_timeout)
            if "error" in r:
                print(f"  {LABELS[m]} batch {b}: {r['error']}", file=sys.stderr, flush=True)
                break
            peaks.append(r["peak_mb"] / 1024)
            base = r.get("rss_after_import_mb", 0) / 1024 if args.device == "cpu" else 0.0
        if len(peaks) < 2:
            continue
        per_image = max(peaks[1] - peaks[0], 0.0)
        fixed = max(peaks[0] - per_image - base, 0.0)
        section, key = TRAIN_BATCH[m]
        batch = getattr(getattr(cfg, section), key).batch_size
        step = StepMemory(fixed_gb=fixed, per_image_gb=per_image)
        plans = []
        for budget in BUDGETS_GB:
            try:
                plans.append(str(plan_micro_batch(batch, step, budget)))
            except Exception:  # noqa: BLE001 - a step that does not fit
                plans.append("does not fit")
        rows.append([LABELS[m], str(batch), f"{peaks[0]:.2f}", f"{peaks[1]:.2f}", f"{per_image:.2f}", f"{fixed:.2f}",
                     *plans])
        print(f"  {LABELS[m]}: per image {per_image:.2f} GB, fixed {fixed:.2f} GB -> {plans}", file=sys.stderr,
              flush=True)
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        for r in [header] + rows:
            print("  ".join(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

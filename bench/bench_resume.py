"""Cost of checkpointing and of a kill + resume in hdlib.trainer, on a small latent UNet.

    python bench/bench_resume.py [--steps 30] [--every 10] [--batch 8] [--width 32] [--latent 16]

Prints, from this one run:
  * steps/s with a checkpoint every `--every` steps vs only the one at the end, and
    the cost of one checkpoint (seconds and MB);
  * a run SIGKILLed just after its checkpoint at step 2*every, then resumed to the end:
    its training time (before the kill + after the resume, including the reload and the
    steps redone) vs the uninterrupted run, and whether the loss curve is bit-identical.
Runs on the GPU when there is one, else on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hdlib.training.batching import TensorBatchSource  # noqa: E402
from hdlib.training.settings import TrainConfig  # noqa: E402
from hdlib.training.trainer import Trainer  # noqa: E402


def build(args):
    """A small UNet on 4-channel latents and a denoising loss with per-sample noise."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        w = args.width
        unet = UNet2DModel(sample_size=args.latent, in_channels=4, out_channels=4, block_out_channels=(w, 2 * w, 2 * w),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                           attention_head_dim=8, norm_num_groups=8)
    latents = torch.randn(256, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(1))

    def loss_fn(model, batch, seeds):
        z0 = batch[0]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens]).to(z0.device)
        t = torch.stack([torch.randint(0, 1000, (), generator=g) for g in gens]).to(z0.device)
        a = (1 - t.float() / 1000).view(-1, 1, 1, 1)
        return (model(a.sqrt() * z0 + (1 - a).sqrt() * noise, t).sample - noise).pow(2).mean()

    return unet, loss_fn, TensorBatchSource(latents)


def config(args, out, every):
    return TrainConfig(out_dir=str(out), max_steps=args.steps, global_batch_size=args.batch, lr=1e-4,
                       ema_decay=0.999, checkpointing_steps=every, checkpoints_total_limit=2, log_every=1,
                       seed=0, progress=False)


class TimedTrainer(Trainer):
    """Times every checkpoint save and load, so their cost is measured directly and not
    as a difference of two wall times (noisy on a shared machine)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.save_s, self.load_s = [], []

    def save_checkpoint(self):
        t0 = time.perf_counter()
        path = super().save_checkpoint()
        self.save_s.append(time.perf_counter() - t0)
        return path

    def load_checkpoint(self, path=None):
        t0 = time.perf_counter()
        step = super().load_checkpoint(path)
        self.load_s.append(time.perf_counter() - t0)
        return step


def train(args, out, every):
    model, loss_fn, data = build(args)
    t0 = time.perf_counter()
    trainer = TimedTrainer(model, loss_fn, data, config(args, out, every))
    result = trainer.train()
    return result, time.perf_counter() - t0, trainer


def step_seconds(out, every):
    """Median seconds per training step from log.csv (steps right after a checkpoint left out)."""
    el = [(int(r["step"]), float(r["elapsed_s"])) for r in read_log(out)]
    d = [b - a for (s0, a), (s1, b) in zip(el, el[1:]) if s0 % every]
    return statistics.median(d)


def read_log(out):
    with open(Path(out) / "log.csv") as f:
        return list(csv.DictReader(f))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # out_dir of the run that gets killed
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    if args.worker:
        train(args, args.worker, args.every)
        return 0
    if args.steps < 3 * args.every:
        ap.error("--steps must be at least 3 x --every (the kill comes after the checkpoint at 2 x every)")

    tmp = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    try:
        model = build(args)[0]
        n_params = sum(p.numel() for p in model.parameters())
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        print(f"UNet {n_params / 1e6:.2f} M params, latents 4x{args.latent}x{args.latent}, batch {args.batch}, "
              f"{args.steps} steps, EMA on; {device}")

        train(args, tmp / "warmup", args.steps + 1)  # first-call costs (imports, allocator) out of the timings
        never, t_never, _ = train(args, tmp / "never", args.steps)  # only the checkpoint at the end
        every, t_every, tr_every = train(args, tmp / "every", args.every)
        ckpt = tmp / "every" / "checkpoints" / f"step-{args.steps:08d}"
        ckpt_mb = sum(f.stat().st_size for f in ckpt.iterdir()) / 2**20
        step_s, save_s = step_seconds(tmp / "every", args.every), statistics.median(tr_every.save_s)
        print(f"\ncheckpointing: one save {save_s:.3f} s (median of {len(tr_every.save_s)}), {ckpt_mb:.1f} MB "
              f"(model + EMA + AdamW state); one step {step_s:.3f} s (median)")
        print(f"  overhead of a checkpoint every {args.every} steps: {save_s / (args.every * step_s):.1%} "
              f"(from the medians); wall clock: {args.steps / never.wall_s:.2f} steps/s with the final "
              f"checkpoint only vs {args.steps / every.wall_s:.2f} steps/s (ratio {every.wall_s / never.wall_s:.3f})")

        # kill just after the checkpoint at 2*every, when the run is part-way to the next one
        out = tmp / "killed"
        kill_after = 2 * args.every
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out)] + [
            f"--{k}={getattr(args, k)}" for k in ("steps", "every", "batch", "width", "latent")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while not (out / "checkpoints" / f"step-{kill_after:08d}" / "COMPLETE").exists():
                if proc.poll() is not None:
                    raise SystemExit(f"worker failed: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.01)
            time.sleep(0.5 * args.every * step_s)  # half-way to the next checkpoint
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        rows = read_log(out)
        killed_at, killed_elapsed = int(rows[-1]["step"]), float(rows[-1]["elapsed_s"])
        resumed, t_resume, tr_resumed = train(args, out, args.every)
        start = resumed.resumed_from_step
        same_curve = [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(tmp / "every")]
        total = killed_elapsed + t_resume
        steps_run = killed_at + args.steps - start
        print(f"\nkill + resume: killed at step {killed_at}, resumed from checkpoint {start} "
              f"({killed_at - start} steps redone); reload {tr_resumed.load_s[0]:.3f} s")
        print(f"  work: {steps_run} steps + 1 reload vs {args.steps} steps uninterrupted "
              f"(ratio {(steps_run * step_s + tr_resumed.load_s[0]) / (args.steps * step_s):.3f} from the medians)")
        print(f"  wall clock: {killed_elapsed:.2f} s before the kill + {t_resume:.2f} s resume call = {total:.2f} s "
              f"vs {t_every:.2f} s uninterrupted (ratio {total / t_every:.3f})")
        print(f"  loss curve identical to the uninterrupted run: {same_curve}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

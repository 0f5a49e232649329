"""Tiny training job for the trainer tests: a 2-layer MLP regressing random data.

    python tests/_train_toy.py --out DIR --max-steps 20 [--sleep 0.05] ...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_train_toy.py --out DIR ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hdlib.training.batching import TensorBatchSource  # noqa: E402
from hdlib.training.settings import TrainConfig  # noqa: E402
from hdlib.training.trainer import Trainer  # noqa: E402


def toy_model(seed: int = 0, dim: int = 8, hidden: int = 16) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def toy_data(n: int = 48, dim: int = 8) -> TensorBatchSource:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, dim, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh() + 0.1 * torch.randn(n, 1, generator=g)
    return TensorBatchSource(x, y)


def toy_loss(sleep_s: float = 0.0):
    """MSE on inputs jittered with per-sample noise drawn from the sample seeds."""
    def loss_fn(model, batch, sample_seeds):
        if sleep_s:
            time.sleep(sleep_s)
        x, y = batch
        jitter = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                              for s in sample_seeds]).to(x.device)
        return ((model(x + 0.1 * jitter) - y) ** 2).mean()
    return loss_fn


def toy_config(out, max_steps=20, global_batch=8, micro=None, ckpt_every=5, log_every=1, ema=None, **kw):
    kw = {"lr": 1e-2, "warmup_steps": 3, "seed": 7, "progress": False, **kw}
    return TrainConfig(out_dir=str(out), max_steps=max_steps, global_batch_size=global_batch,
                       micro_batch_size=micro, ema_decay=ema, checkpointing_steps=ckpt_every,
                       log_every=log_every, **kw)


class LoggingItems(torch.utils.data.Dataset):
    """Per-item dataset (read like images from disk) that appends '<rank> <index>' per read."""

    def __init__(self, data: TensorBatchSource, log: str):
        self.x, self.y = data.tensors
        self.log = log

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import os

        with open(self.log, "a") as fh:
            fh.write(f"{os.environ.get('RANK', '0')} {i}\n")
        return self.x[i], self.y[i]


def main(argv=None) -> int:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro", type=int)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--ema", type=float)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--stream-log", help="read items one by one through a DataLoader, logging each read")
    a = ap.parse_args(argv)
    cfg = toy_config(a.out, a.max_steps, a.global_batch, a.micro, a.ckpt_every, a.log_every, a.ema)
    data = toy_data()
    if a.stream_log:
        from hdlib.data.streaming import StreamingSource

        data = StreamingSource(LoggingItems(data, a.stream_log), num_workers=0)
    trainer = Trainer(toy_model(), toy_loss(a.sleep), data, cfg)
    trainer.train()
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""torch's intra-op thread count, set for one piece of work and restored after it.

A count left behind changes float reductions in whatever runs next in the process: a test that
draws a study's images again after a one-thread pre-training run gets different bits."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None):
    """Run the block on `n` torch threads (0 or None: leave the count as it is), then restore it."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


__all__ = ["torch_threads"]

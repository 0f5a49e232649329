"""Sharded synthesis on several devices (what `python -m hdlib sample` runs under the
launcher): each process generates a contiguous shard of a request (every image has its
own seed) and writes synthetic/<set>/shard-<rank>.pt; the caller merges the shards in
request order (`stages.synthesis.merge_shards`). An image agrees across shardings to
float tolerance (see hdlib.sampling.samplers for the exact guarantee).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..io import atomic_torch_save
from ..sampling.samplers import shard
from ..study.context import config_from_results, launched_rank
from ..study.generation import Generation
from ..study.synthetic_sets import STOP, round_request, round_shard


def generate_shard(gen, generator, fraction, draw, labels, seeds, guidance_scale, rank, world):
    """(indices, latents, images) of this rank's contiguous part of the request."""

    idx = torch.as_tensor(list(shard(len(labels), rank, world)), dtype=torch.long)
    z = gen.latents(generator, fraction, labels[idx], seeds[idx], guidance_scale=guidance_scale, draw=draw,
                    progress=False)
    return idx, z, gen.decode(z)


def sample_main(study_dir: str, generator: str, fraction: float, draw: int, request: str, adaptation: str,
                guidance_scale: float | None = None, guidance_interval: list[int] | None = None) -> int:
    rank, world = launched_rank()
    cfg = config_from_results(study_dir)
    req = torch.load(request, weights_only=True)
    idx, z, images = generate_shard(Generation(cfg, adaptation, guidance_interval=guidance_interval), generator,
                                    fraction, draw, req["labels"], req["seeds"], guidance_scale, rank, world)
    atomic_torch_save({"index": idx, "latents": z.cpu(), "images": images.cpu()},
                      Path(request).parent / f"shard-{rank:03d}.pt")
    return 0


def serve_main(study_dir: str, generator: str, fraction: float, draw: int, folder: str, adaptation: str,
               guidance_scale: float | None = None, guidance_interval: list[int] | None = None,
               poll_s: float = 0.1) -> int:
    """A sampling server for one synthetic set (`python -m hdlib sample --serve` under the launcher): each
    process loads its models once, then answers round after round of requests (round-NNNN.request.pt,
    written by the caller) with its shard (round-NNNN.shard-RRR.pt), until the caller writes sampling.stop.
    Before, every round relaunched every process and reloaded the models."""
    rank, world = launched_rank()
    gen = Generation(config_from_results(study_dir), adaptation, guidance_interval=guidance_interval)
    folder, n = Path(folder), 0
    while True:
        req_path = round_request(folder, n)
        while not req_path.exists() and not (folder / STOP).exists():
            time.sleep(poll_s)
        if not req_path.exists():
            break
        req = torch.load(req_path, weights_only=True)
        idx, z, images = generate_shard(gen, generator, fraction, draw, req["labels"], req["seeds"], guidance_scale,
                                        rank, world)
        atomic_torch_save({"index": idx, "latents": z.cpu(), "images": images.cpu()}, round_shard(folder, n, rank))
        n += 1
    return 0

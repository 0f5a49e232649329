"""Sharded synthesis on several devices (what `python -m hdlib sample` runs under the
launcher): each process generates a contiguous shard of a request (every image has its
own seed) and writes synthetic/<set>/shard-<rank>.pt; the caller merges the shards in
request order (`stages.synthesis.merge_shards`). An image agrees across shardings to
float tolerance (see hdlib.sampling for the exact guarantee).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState

from .io import atomic_torch_save
from .sampling import shard
from .study.context import config_from_results
from .study.generation import Generation


def generate_shard(gen, generator, fraction, draw, labels, seeds, guidance_scale, rank, world):
    """(indices, latents, images) of this rank's contiguous part of the request."""

    idx = torch.as_tensor(list(shard(len(labels), rank, world)), dtype=torch.long)
    z = gen.latents(generator, fraction, labels[idx], seeds[idx], guidance_scale=guidance_scale, draw=draw,
                    progress=False)
    return idx, z, gen.decode(z)


def sample_main(study_dir: str, generator: str, fraction: float, draw: int, request: str, adaptation: str,
                guidance_scale: float | None = None, guidance_interval: list[int] | None = None) -> int:
    state = PartialState()
    cfg = config_from_results(study_dir, [f"study.device={state.device}"])
    req = torch.load(request, weights_only=True)
    idx, z, images = generate_shard(Generation(cfg, adaptation, guidance_interval=guidance_interval), generator, fraction, draw, req["labels"],
                                    req["seeds"], guidance_scale, state.process_index, state.num_processes)
    atomic_torch_save({"index": idx, "latents": z.cpu(), "images": images.cpu()},
                      Path(request).parent / f"shard-{state.process_index:03d}.pt")
    state.wait_for_everyone()
    return 0

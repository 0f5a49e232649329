"""Sharded synthesis on several devices (what `python -m hdlib sample` runs):

    accelerate launch --num_processes 4 -m hdlib sample --study-dir results/nct_crc \
        --generator histodiffusion --fraction 0.05 --per-class 500 --name histodiffusion_f0.05

Each process generates a contiguous shard of the request (every image has its own
seed) and writes it to synthetic/<name>/shard-<rank>.pt; the caller merges the
shards in request order (`stages.synthesis.merge_shards`). An image agrees across
shardings to float tolerance (see hdlib.sampling for the exact guarantee).
"""

from __future__ import annotations

import torch

from .io import atomic_torch_save
from .paths import StudyPaths


def generate_shard(gen, generator, fraction, labels, seeds, guidance_scale, rank, world):
    """(indices, latents, images) of this rank's contiguous part of the request."""
    from .sampling import shard

    idx = torch.as_tensor(list(shard(len(labels), rank, world)), dtype=torch.long)
    z = gen.latents(generator, fraction, labels[idx], seeds[idx], guidance_scale=guidance_scale)
    return idx, z, gen.decode(z)


def sample_main(study_dir: str, generator: str, fraction: float, per_class: int, name: str,
                guidance_scale: float | None = None) -> int:
    from accelerate import PartialState

    from .stages.common import config_from_results
    from .stages.synthesis import Generation, request_seeds

    cfg = config_from_results(study_dir)
    state = PartialState()
    cfg.study.device = str(state.device)
    labels = torch.arange(len(cfg.data.classes)).repeat_interleave(per_class)
    seeds = torch.as_tensor(request_seeds(cfg, name, len(labels)))
    idx, z, images = generate_shard(Generation(cfg), generator, fraction, labels, seeds, guidance_scale,
                                    state.process_index, state.num_processes)
    atomic_torch_save({"index": idx, "latents": z.cpu(), "images": images.cpu()},
                      StudyPaths(study_dir).synthetic(name) / f"shard-{state.process_index:03d}.pt")
    state.wait_for_everyone()
    return 0

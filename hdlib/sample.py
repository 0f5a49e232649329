"""Sharded synthesis on several devices:

    accelerate launch --num_processes 4 -m hdlib.sample --study-dir results/nct_crc --generator guided \
        --fraction 0.05 --per-class 500 --name guided_f0.05

Each process generates a contiguous shard of the request (every image has its own
seed, so an image does not depend on the shard it falls in) and writes it to
synthetic/<name>/shard-<rank>.pt; rank 0 then merges the shards in order.
`hdlib.study.synthesize` calls this when `study.num_processes` > 1.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import HDLibError, one_line_errors
from .io import atomic_torch_save


def generate_shard(cfg, generator, fraction, labels, seeds, guidance_scale, rank, world, device=None):
    from .sampling import shard
    from .study import decode, generate_latents

    idx = shard(len(labels), rank, world)
    idx = torch.as_tensor(list(idx), dtype=torch.long)
    if device is not None:
        cfg.study.device = device
    z = generate_latents(cfg, generator, fraction, labels[idx], seeds[idx], guidance_scale=guidance_scale)
    return idx, z, decode(cfg, z)


def merge_shards(paths) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [torch.load(p, weights_only=False) for p in paths]
    order = torch.cat([p["index"] for p in parts])
    if not torch.equal(order, torch.arange(len(order))):
        raise HDLibError("sample shards do not cover the request exactly once: " + ", ".join(map(str, paths)))
    return torch.cat([p["latents"] for p in parts]), torch.cat([p["images"] for p in parts])


@one_line_errors
def main(argv=None) -> int:
    from accelerate import PartialState

    from .study import config_from_results, request_seeds, synthetic_dir

    ap = argparse.ArgumentParser(prog="python -m hdlib.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--study-dir", required=True, help="results/<study> (its config.json is used)")
    ap.add_argument("--generator", required=True)
    ap.add_argument("--fraction", type=float, required=True)
    ap.add_argument("--per-class", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--guidance-scale", type=float)
    a = ap.parse_args(argv)
    cfg = config_from_results(a.study_dir)
    state = PartialState()
    K = len(cfg.data.classes)
    labels = torch.arange(K).repeat_interleave(a.per_class)
    seeds = torch.as_tensor(request_seeds(cfg, a.name, len(labels)))
    dev = str(state.device)
    idx, z, images = generate_shard(cfg, a.generator, a.fraction, labels, seeds, a.guidance_scale,
                                    state.process_index, state.num_processes, device=dev)
    out = synthetic_dir(cfg, a.name)
    atomic_torch_save({"index": idx, "latents": z.cpu(), "images": images.cpu()},
                      out / f"shard-{state.process_index:03d}.pt")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())

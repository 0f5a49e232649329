"""The study's autoencoder and its latent cache (encoded once, scaled, memory-mapped)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..data.latents import LatentStore, LatentWriter
from ..data.streaming import loader
from ..io import atomic_torch_save, atomic_write_csv, atomic_write_json
from ..models.builders import (
    build_autoencoder,
    decode_latents,
    encode_images,
    images_to_model_range,
    psnr_ssim,
)
from ..models.pretrained import load_vae, read_latent_info
from ..parallel.launch import launch
from ..paths import REPO_ROOT, StudyPaths
from ..sampling.samplers import shard
from ..training.weights import load_final
from .context import device, read_metrics, require, write_metrics
from .splits import load_split_images, split_images, split_labels, split_sources

LATENT_SPLITS = ("pool", "target_train", "target_val", "target_test")


def load_autoencoder(cfg: Config):
    """The study's autoencoder (eval mode, frozen): the pre-trained one when
    `pretrained.path` is set, else the one stage 01 trained."""
    if cfg.pretrained.path:
        return load_vae(cfg.pretrained.path).eval().requires_grad_(False)

    vae = build_autoencoder(cfg.autoencoder)
    load_final(vae, require(StudyPaths(cfg).model("autoencoder"), "autoencoder"), ema=False)
    return vae.eval().requires_grad_(False)


def latent_dir(cfg: Config):
    return StudyPaths(cfg).cache / "latents"


def _latent_shape_of(vae, image_size: int) -> tuple:
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    return (int(vae.config.latent_channels), image_size // down, image_size // down)


@torch.no_grad()
def encode_shard(cfg: Config, rank: int = 0, world: int = 1, dev: str | None = None) -> None:
    """Encode this process's shard of every split into the preallocated memory maps
    (raw posterior mean and std, unscaled)."""

    vae = load_autoencoder(cfg).to(dev or device(cfg))
    shape = _latent_shape_of(vae, cfg.data.image_size)
    for split in LATENT_SPLITS:
        ds = split_images(cfg, split)
        rows = np.asarray(list(shard(len(ds), rank, world)), dtype=np.int64)
        if not len(rows):
            continue
        writer = LatentWriter(latent_dir(cfg), split, len(ds), shape, create=False)
        done = 0
        for x, _ in loader(ds.subset(rows), 64, cfg.data.num_workers, progress=cfg.study.progress and rank == 0,
                           desc=f"encode {split}"):
            post = vae.encode(images_to_model_range(x).to(next(vae.parameters()).device)).latent_dist
            writer.write(rows[done:done + len(x)], post.mean, post.std)
            done += len(x)


def encode_latents(cfg: Config, params_file: str | None = None) -> dict:
    """The latent cache: preallocate, encode (in-process, or one shard per process under the
    launcher), then scale every split by 1/std of the pool means (or the pre-trained scale)."""

    root = latent_dir(cfg)
    vae = load_autoencoder(cfg)
    shape = _latent_shape_of(vae, cfg.data.image_size)
    sizes = {s: len(split_images(cfg, s)) for s in LATENT_SPLITS}
    for split, n in sizes.items():
        LatentWriter(root, split, n, shape, create=True)
    if cfg.study.num_processes > 1:
        launch(["-m", "hdlib", "encode", "--study-dir", str(cfg.results_dir)], cfg.study.num_processes, cwd=REPO_ROOT)
    else:
        encode_shard(cfg)
    # scale: 1/std of the pool's raw posterior means, accumulated chunk by chunk
    s1 = s2 = 0.0
    for i in range(0, sizes["pool"], 4096):  # the map is opened per chunk: memory stays flat
        pool = np.load(root / "pool.mean.npy.part", mmap_mode="r")
        chunk = np.asarray(pool[i:i + 4096], dtype=np.float64)
        s1, s2 = s1 + chunk.sum(), s2 + (chunk ** 2).sum()
        del pool
    count = sizes["pool"] * int(np.prod(shape))
    raw_std = float(np.sqrt(max(s2 / count - (s1 / count) ** 2, 1e-12)))
    if cfg.pretrained.path:
        scale = float(read_latent_info(cfg.pretrained.path)["scaling_factor"])
    else:
        scale = 1.0 / raw_std
    for split, n in sizes.items():
        w = LatentWriter(root, split, n, shape, create=False)
        w.scale(scale)
        w.finish(split_labels(cfg, split).numpy())
    meta = {"scale": scale, "raw_pool_std": raw_std, "shape": list(shape), "counts": sizes,
            "dtype": "float16", "stores": "posterior mean and std, scaled"}
    atomic_write_json(root / "latents.json", meta)
    return meta


def latent_store(cfg: Config):

    return LatentStore(latent_dir(cfg))


def training_log(cfg: Config, name: str) -> pd.DataFrame:
    return pd.read_csv(require(StudyPaths(cfg).model(name) / "log.csv", f"training log of {name}"))


def latent_scale(cfg: Config) -> float:
    return float(read_metrics(cfg, "01_autoencoder")["scale_factor"])


RECONSTRUCTION_EXAMPLES = 8  # per source, kept for stage 01's figure


def reconstruction_examples_path(cfg: Config):
    return StudyPaths(cfg).cache / "reconstruction_examples.pt"


def encode_and_measure(cfg: Config) -> dict:
    """Encode every split once and evaluate reconstructions on held-out pool tiles per source
    and on the target's validation split. The first RECONSTRUCTION_EXAMPLES of each source (evenly
    spaced for the target) and their reconstructions are kept for the figure, not computed again."""

    dev, paths = device(cfg), StudyPaths(cfg)
    meta = encode_latents(cfg)
    vae = load_autoencoder(cfg)
    rows, examples = [], {}
    hold_src = np.array(split_sources(cfg, "pool_holdout"))
    sets = [(name, np.flatnonzero(hold_src == name), "pool_holdout") for name in dict.fromkeys(hold_src)]
    n_val = len(split_images(cfg, "target_val"))
    sets.append(("target (val)", np.arange(min(n_val, 256)), "target_val"))
    for name, idx, split in sets:
        if len(idx) == 0:
            continue
        imgs, _ = load_split_images(cfg, split, idx)
        rec = decode_latents(vae, encode_images(vae, imgs, 1.0, device=dev), 1.0, device=dev)
        psnr, ssim = psnr_ssim(imgs, rec)
        n = RECONSTRUCTION_EXAMPLES
        show = (np.arange(len(idx)) if split == "pool_holdout" else np.arange(0, len(idx), max(1, len(idx) // n)))[:n]
        label = name.removesuffix(" (val)")
        examples[label], examples[f"{label} (recon)"] = imgs[show], rec[show]
        rows.append({"source": name, "n": len(imgs), "psnr_db": float(psnr.mean()), "psnr_std": float(psnr.std()),
                     "ssim": float(ssim.mean())})
    atomic_write_csv(pd.DataFrame(rows), paths.table("autoencoder_reconstruction"))
    atomic_torch_save(examples, reconstruction_examples_path(cfg))
    store = latent_store(cfg)
    sample = store.means("pool", np.arange(min(len(store.mean("pool")), 4096)))
    pool_rows = [r for r in rows if r["source"] != "target (val)"]
    metrics = {
        "pretrained": cfg.pretrained.path or None,
        "latent_shape": meta["shape"], "scale_factor": meta["scale"], "raw_latent_std": meta["raw_pool_std"],
        "latent_counts": meta["counts"],
        "scaled_latent_mean": float(sample.mean()), "scaled_latent_std": float(sample.std()),
        "per_channel_std": [float(v) for v in sample.transpose(0, 1).flatten(1).std(1)],
        "reconstruction": rows,
        "heldout_pool_psnr_db": float(np.average([r["psnr_db"] for r in pool_rows], weights=[r["n"] for r in pool_rows])),
    }
    write_metrics(cfg, "01_autoencoder", metrics)
    return metrics

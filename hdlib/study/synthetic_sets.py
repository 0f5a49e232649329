"""Synthetic sets: quota filling on disk (resumable, content-keyed) and the images a grid
cell adds to its labeled subset."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset

from ..config import Config
from ..data.streaming import ManifestImages, load_into_memory
from ..errors import HDLibError
from ..io import atomic_torch_save
from ..parallel.launch import launch_background
from ..paths import (
    COMBINED_SETS,
    GENERATORS,
    PSEUDO_LABEL_SETS,
    REPO_ROOT,
    StudyPaths,
    is_filtered,
    request_seed_base,
    seeds_from,
    synthetic_set_name,
    task_seed,
    training_set_generator,
)
from ..sampling.quota import fill_quota
from .context import require
from .generation import Generation
from .pseudo_labels import pseudo_label_images
from .splits import fraction_labels, manifest_hash


def generators_needed(cfg: Config) -> list[str]:
    """Generators whose samples the downstream grid uses."""
    sets = set(cfg.downstream.training_sets) | set(cfg.downstream.ratio_sweep_sets)
    return [g for g in GENERATORS if any(training_set_generator(s) == g for s in sets)]


def quota_per_class(cfg: Config, fraction: float, draw: int) -> np.ndarray:
    """Synthetic images each class needs: the largest ratio used at this fraction x its real count."""
    ds = cfg.downstream
    ratio = max([ds.ratio] + (list(ds.ratio_sweep) if fraction == ds.ratio_sweep_fraction else []))
    counts = np.bincount(fraction_labels(cfg, fraction, draw).numpy(), minlength=len(cfg.data.classes))
    return np.ceil(ratio * counts - 1e-9).astype(np.int64)


def set_recipe(cfg: Config, generator: str, fraction: float, draw: int) -> dict:
    """How `synthesize` fills a filtered set (what `hdlib augment --as-study` needs to draw it again from an
    export): its name, quota per class, candidate cap, the selection and its seed, each class's first seed."""
    name = synthetic_set_name(generator, fraction, draw)
    return {"name": name, "fraction": fraction, "draw": draw, "quota": quota_per_class(cfg, fraction, draw).tolist(),
            "cap_factor": cfg.sampling.max_candidates_factor, "selection": cfg.filtering.selection,
            "selection_seed": task_seed(cfg, "selection", name),
            "seed_bases": [request_seed_base(cfg, f"{name}/class{c}") for c in range(len(cfg.data.classes))]}


def synthesize(gen: Generation, generator: str, fraction: float, draw: int, quota, judge=None,
               guidance_scale: float | None = None, tag: str = "") -> pd.DataFrame:
    """Fill `quota` (an int or one per class) with `generator`'s images for label draw `draw`
    (`hdlib.quota.fill_quota`: rounds until every class has its quota of accepted images or
    reached sampling.max_candidates_factor x quota candidates; without a judge exactly the
    quota). Returns the set's manifest (one row per candidate, decision included); PNGs and
    manifest.csv are in synthetic/<name>/. Reused only when the request and the content of
    every model it used are unchanged; resumes after a kill at the last finished round."""
    cfg, s = gen.cfg, gen.sampling
    name = synthetic_set_name(generator, fraction, draw, tag)
    folder = StudyPaths(cfg).synthetic(name)
    scale = gen.guidance_scale(generator, guidance_scale)
    request = {"generator": generator, "fraction": fraction, "draw": draw, "guidance_scale": scale,
               "adaptation": gen.adaptation, "sampling": vars(s),
               # the selection only when not the paper's, so sets made before the setting existed stay valid
               "filtering": ({k: v for k, v in vars(cfg.filtering).items()
                              if k != "selection" or v != "closest"} if judge is not None else None),
               "labeled": manifest_hash(cfg, "target_train", fraction, draw) if judge is not None else None,
               "inputs": gen.inputs_key(generator, fraction, draw)}

    def seeds_of(c, start, n):  # candidate k of a class always gets the same seed
        return seeds_from(request_seed_base(cfg, f"{name}/class{c}"), start, n)

    meta = {"source": generator, "guidance_scale": scale, "model": gen.models_of(generator, fraction, draw)["denoiser"],
            "fraction": fraction, "draw": draw}

    def fill(sample):
        return fill_quota(folder, list(cfg.data.classes), quota, sample, seeds_of, request, judge=judge,
                          selection=cfg.filtering.selection, seed=task_seed(cfg, "selection", name),
                          cap_factor=s.max_candidates_factor, meta=meta)

    if cfg.study.num_processes > 1:  # one process group for every round of this set: models load once
        with ShardedSampler(gen, generator, fraction, draw, guidance_scale, folder) as sharded:
            return fill(lambda labels, seeds: sharded(labels, seeds)[1])
    return fill(lambda labels, seeds: gen.decode(gen.latents(generator, fraction, labels, seeds,
                                                             guidance_scale=guidance_scale, draw=draw)))


STOP = "sampling.stop"  # written by the caller when a set is done: the sampling server exits


def round_request(folder: Path, n: int) -> Path:
    return Path(folder) / f"round-{n:04d}.request.pt"


def round_shard(folder: Path, n: int, rank: int) -> Path:
    return Path(folder) / f"round-{n:04d}.shard-{rank:03d}.pt"


class ShardedSampler:
    """Rounds of one set generated by `study.num_processes` processes: one launch (`hdlib sample --serve`)
    whose processes load their models once and answer every round with a contiguous shard of its
    request, merged back in request order. `launches` counts the process groups started."""

    launches = 0

    def __init__(self, gen: Generation, generator, fraction, draw, guidance_scale, folder, poll_s: float = 0.1):
        self.gen, self.folder, self.poll_s, self.round = gen, Path(folder) / "rounds", poll_s, 0
        self.args = ["-m", "hdlib", "sample", "--study-dir", str(gen.cfg.results_dir), "--generator", generator,
                     "--fraction", repr(fraction), "--draw", str(draw), "--serve", str(self.folder),
                     "--adaptation", gen.adaptation,
                     # the resolved scale: a worker rebuilds the config from disk, where no stage choice is written
                     "--guidance-scale", repr(gen.guidance_scale(generator, guidance_scale)),
                     # the chosen interval, likewise (last: an empty interval is the bare flag)
                     "--guidance-interval", *map(str, gen.sampling.guidance_interval)]
        self.world = gen.cfg.study.num_processes
        self.proc = None

    def __enter__(self):
        shutil.rmtree(self.folder, ignore_errors=True)  # rounds of a killed run: never read
        self.folder.mkdir(parents=True)
        self.proc = launch_background(self.args, self.world, cwd=REPO_ROOT)
        ShardedSampler.launches += 1
        return self

    def __call__(self, labels, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        atomic_torch_save({"labels": torch.as_tensor(labels), "seeds": torch.as_tensor(seeds)},
                          round_request(self.folder, self.round))
        shards = [round_shard(self.folder, self.round, r) for r in range(self.world)]
        while not all(p.exists() for p in shards):
            if self.proc.poll() is not None:
                raise HDLibError(f"sampling processes for {self.folder.parent.name} stopped (exit "
                                 f"{self.proc.returncode}) before round {self.round} was answered")
            time.sleep(self.poll_s)
        z, images = merge_shards(shards)
        for p in shards + [round_request(self.folder, self.round)]:
            p.unlink()
        self.round += 1
        return z, images

    def __exit__(self, *exc):
        (self.folder / STOP).write_text("")
        try:
            code = self.proc.wait(timeout=600)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
        if code and exc[0] is None:
            raise HDLibError(f"sampling processes for {self.folder.parent.name} exited with {code}")
        return False


def merge_shards(paths) -> tuple[torch.Tensor, torch.Tensor]:
    """Shards written by `hdlib sample` -> (latents, images) in request order."""
    parts = [torch.load(p, weights_only=False) for p in paths]
    order = torch.cat([p["index"] for p in parts])
    if not torch.equal(order, torch.arange(len(order))):
        raise HDLibError("sample shards do not cover the request exactly once: " + ", ".join(map(str, paths)))
    return torch.cat([p["latents"] for p in parts]), torch.cat([p["images"] for p in parts])


def load_set(cfg: Config, name: str) -> pd.DataFrame:
    return pd.read_csv(require(StudyPaths(cfg).synthetic(name) / "manifest.csv", f"synthetic set {name}"))


def set_content_key(cfg: Config, name: str) -> str:
    state = json.loads(require(StudyPaths(cfg).synthetic(name) / "request.json", f"synthetic set {name}").read_text())
    if not state.get("complete"):
        raise HDLibError(f"synthetic set {name} is incomplete; re-run stage 04")
    return state["content_key"]


def set_images(cfg: Config, frame: pd.DataFrame):
    """A synthetic set's rows as a dataset streamed from its PNGs."""

    return ManifestImages(frame.reset_index(drop=True), cfg.data.image_size)


def accounting(cfg: Config, frame: pd.DataFrame, quota, set_name: str) -> pd.DataFrame:
    """Requested vs achieved kept images per class (and candidates generated)."""
    K = len(cfg.data.classes)
    quota = np.broadcast_to(np.asarray(quota), (K,))
    rows = []
    for c in range(K):
        g = frame[frame["label"] == c]
        rows.append({"set": set_name, "class": cfg.data.classes[c], "requested": int(quota[c]),
                     "achieved": int(g["kept"].sum()), "candidates": len(g),
                     "shortfall": int(max(0, quota[c] - g["kept"].sum())),
                     "near_copies": int(g["near_copy"].astype(bool).sum())})
    return pd.DataFrame(rows)


def added_training_images(cfg: Config, training_set: str, fraction: float, ratio: float, draw: int):
    """The images a grid cell adds to one labeled subset: per class, the first round(ratio x
    real count) kept images (best ranked) of a filtered synthetic set, or the first candidates
    of an unfiltered one, or (`pseudo_label`) the most confident pseudo-labeled unlabeled
    target images. Returns (dataset, labels, content key) or (None, None, "")."""
    if training_set in COMBINED_SETS:  # each part at the ratio, concatenated (the rival's images first)
        parts = [added_training_images(cfg, part, fraction, ratio, draw) for part in COMBINED_SETS[training_set]]
        parts = [p for p in parts if p[0] is not None and len(p[0])]
        if not parts:
            return None, None, ""
        key = hashlib.sha1("|".join(p[2] for p in parts).encode()).hexdigest()
        return ConcatDataset([p[0] for p in parts]), torch.cat([p[1] for p in parts]), key
    if training_set in PSEUDO_LABEL_SETS:
        return pseudo_label_images(cfg, fraction, ratio, draw) if ratio else (None, None, "")
    gen = training_set_generator(training_set)
    if gen is None or ratio == 0:
        return None, None, ""
    name = synthetic_set_name(gen, fraction, draw)
    df = load_set(cfg, name)
    real_counts = np.bincount(fraction_labels(cfg, fraction, draw).numpy(), minlength=len(cfg.data.classes))
    parts = []
    for c, n_real in enumerate(real_counts):
        n = int(round(ratio * n_real))
        g = df[df["label"] == c]
        g = g[g["kept"]].sort_values("rank") if is_filtered(training_set) else g.sort_values("index")
        parts.append(g.head(n))
    chosen = pd.concat(parts).reset_index(drop=True)
    key = hashlib.sha1((set_content_key(cfg, name) + ",".join(chosen["path"])).encode()).hexdigest()
    return set_images(cfg, chosen), torch.tensor(chosen["label"].to_numpy(), dtype=torch.long), key


def _in_memory(cfg: Config, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:

    return load_into_memory(set_images(cfg, frame), num_workers=cfg.data.num_workers)


def first_images(cfg: Config, frame: pd.DataFrame, kept: bool, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of the first `n` per class of a set: the best-ranked kept images,
    or the first candidates. An empty selection gives empty tensors."""
    g = frame[frame["kept"]].sort_values(["label", "rank"]) if kept else frame.sort_values(["label", "index"])
    g = g.groupby("label").head(n)
    ds = set_images(cfg, g)
    if len(ds) == 0:
        return (torch.zeros((0, 3, cfg.data.image_size, cfg.data.image_size), dtype=torch.uint8),
                torch.zeros(0, dtype=torch.long))
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(g["label"].to_numpy(), dtype=torch.long)

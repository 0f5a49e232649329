"""The recipe sweep: short runs of recipe variants on the run's own pool latents, ranked by the
provenance-trained judge (FID, recall, the mix of tissue classes) with a grid of samples per
variant; the untrained judge's FID is kept beside it as a second opinion. Its table goes into the
card of the next export."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
import torch

from ..config import load_config
from ..errors import ConfigError
from ..evaluation import plots
from ..io import atomic_path, atomic_write_csv
from ..parallel.threads import torch_threads
from ..paths import StudyPaths
from ..study.context import device
from ..study.latent_models import build_denoiser, noise_scheduler
from ..study.preparation import prepare_data
from ..study.train import train_task
from ..training.weights import load_final
from .recipe import config_with
from .run import check_pretrain_source, encoded_pool
from .samples import sample_images
from .scoring import ProvenanceScorer

GRID_SAMPLES = 12


def parse_recipe_variant(text: str) -> tuple[str, list[str]]:
    """'name: key=value key=value' -> (name, overrides); the overrides are checked when loaded."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name.isidentifier():
        raise ConfigError(f"pretrain.recipe_sweep: bad variant {text!r} (expected 'name: key=value ...')")
    return name, rest.split()


def recipe_sweep(params: str, overrides=()) -> pd.DataFrame:
    """Short runs of recipe variants (prediction type, loss weighting, noise sampling, width, depth,
    learning rate, ...) on the run's own pool latents, each from the same seed for
    `pretrain.sweep_steps` steps and judged alike (same judge, holdout, sample count and seeds),
    ranked by the provenance-trained judge's FID. Resumable: finished variants are kept in
    metrics/pretrain_recipe_sweep.csv, and their samples in the cache for the grid figure."""
    matplotlib.use("Agg")
    cfg = load_config(params, list(overrides))
    p, paths = cfg.pretrain, StudyPaths(cfg)
    variants = [parse_recipe_variant(v) for v in p.recipe_sweep]
    cfgs = {name: load_config(params, list(overrides) + ov) for name, ov in variants}  # bad keys fail here
    check_pretrain_source(cfg)
    with torch_threads(p.threads):  # restored after: a later run in this process keeps its count
        if not paths.manifest("pool").exists():
            prepare_data(cfg)
        if not cfg.pretrained.path:
            train_task(cfg, "autoencoder")  # its ceiling is measured by the main run, where it ends
        vae, scale = encoded_pool(cfg)
        scorer = ProvenanceScorer(cfg)
        out_csv = paths.metrics_dir / "pretrain_recipe_sweep.csv"
        rows = pd.read_csv(out_csv).to_dict("records") if out_csv.exists() else []
        done = {r["variant"] for r in rows}
        for name, ov in variants:
            cached = paths.cache / "recipe_sweep" / f"{name}.pt"
            if name in done and cached.exists():
                continue
            vcfg = config_with(cfgs[name], "diffusion.pretrain.max_steps", p.sweep_steps)
            res = train_task(vcfg, "denoiser_pretrained", out_dir=paths.model("recipe_sweep") / name)
            unet = load_final(build_denoiser(vcfg), paths.model("recipe_sweep") / name, ema=True).eval()
            imgs = sample_images(unet.requires_grad_(False), noise_scheduler(vcfg), vae, scale, p.eval_samples,
                                 p.eval_inference_steps, device=device(cfg))
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(imgs[:GRID_SAMPLES].clone(), cached)
            q = scorer(imgs)
            rows = [r for r in rows if r["variant"] != name] + [{
                "variant": name, "overrides": " ".join(ov) or "(params file as is)", "weights": "ema", "steps": p.sweep_steps,
                "parameters": sum(x.numel() for x in unet.parameters()), "samples": p.eval_samples,
                "ddim_steps": p.eval_inference_steps, **q, "final_loss": res.last_loss, "train_s": res.wall_s,
                "s_per_step": res.wall_s / max(1, res.step - res.resumed_from_step)}]
            atomic_write_csv(pd.DataFrame(rows), out_csv)
            print(f"[sweep] {name}: judge FID {q['fid']:.2f} P {q['precision']:.3f} R {q['recall']:.3f} "
                  f"mixture TV {q['mixture_tv']:.3f}; untrained judge FID {q['random_judge_fid']:.2f}", flush=True)
        table = pd.DataFrame(rows).sort_values("fid").reset_index(drop=True)
        grid = {f"{r.variant} ({r.fid:.0f})": torch.load(paths.cache / "recipe_sweep" / f"{r.variant}.pt")
                for r in table.itertuples()}
        fig = plots.image_rows(grid, n=GRID_SAMPLES, title=f"Recipe sweep: samples after {p.sweep_steps} steps "
                               "(judge FID in brackets, best first)")
        plots.save(fig, cfg, "pretrain_recipe_sweep")
        keep_committed_sweep(cfg)
        return table


def keep_committed_sweep(cfg) -> None:
    """The sweep's table and sample grid beside the committed run (pretrain.committed_run/sweep/), so the
    recipe choice travels with the run it chose."""
    if not cfg.pretrain.committed_run:
        return
    paths, dest = StudyPaths(cfg), Path(cfg.pretrain.committed_run) / "sweep"
    dest.mkdir(parents=True, exist_ok=True)
    for src in (paths.metrics_dir / "pretrain_recipe_sweep.csv", paths.figure("pretrain_recipe_sweep")):
        if src.exists():
            with atomic_path(dest / src.name) as tmp:
                tmp.write_bytes(src.read_bytes())

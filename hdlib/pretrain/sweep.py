"""The recipe sweep: short runs of recipe variants on the run's own pool latents, judged like the
main run; its table goes into the card of the next export."""

from __future__ import annotations

import pandas as pd
import torch

from ..config import load_config
from ..errors import ConfigError
from ..io import atomic_write_csv
from ..paths import StudyPaths
from ..study.latent_models import build_denoiser, noise_scheduler
from ..study.preparation import prepare_data
from ..train import train_task
from ..weights import load_final
from .judges import pool_quality
from .recipe import config_with
from .run import encoded_pool
from .samples import sample_images


def parse_recipe_variant(text: str) -> tuple[str, list[str]]:
    """'name: key=value key=value' -> (name, overrides); the overrides are checked when loaded."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name.isidentifier():
        raise ConfigError(f"pretrain.recipe_sweep: bad variant {text!r} (expected 'name: key=value ...')")
    return name, rest.split()


def recipe_sweep(params: str, overrides=()) -> pd.DataFrame:
    """Short runs of recipe variants (prediction type, min-SNR weighting, schedule, width, ...)
    on the run's own pool latents, each from the same seed for `pretrain.sweep_steps` steps and
    judged like the main run (same judge, holdout, sample count and seeds). The configured recipe
    is also judged with its raw weights, to show what the EMA buys at this run length.
    Resumable: finished variants are kept in metrics/pretrain_recipe_sweep.csv."""
    cfg = load_config(params, list(overrides))
    p, paths = cfg.pretrain, StudyPaths(cfg)
    variants = [parse_recipe_variant(v) for v in p.recipe_sweep]
    cfgs = {name: load_config(params, list(overrides) + ov) for name, ov in variants}  # bad keys fail here
    if p.threads:
        torch.set_num_threads(p.threads)
    if not paths.manifest("pool").exists():
        prepare_data(cfg)
    train_task(cfg, "autoencoder")
    vae, scale, judge, real_feats = encoded_pool(cfg)
    out_csv = paths.metrics_dir / "pretrain_recipe_sweep.csv"
    rows = pd.read_csv(out_csv).to_dict("records") if out_csv.exists() else []
    done = {(r["variant"], r["weights"]) for r in rows}
    for name, ov in variants:
        vcfg = config_with(cfgs[name], "diffusion.pretrain.max_steps", p.sweep_steps)
        out_dir = paths.model("recipe_sweep") / name
        for weights in (("ema", "raw") if name == variants[0][0] else ("ema",)):
            if (name, weights) in done:
                continue
            res = train_task(vcfg, "denoiser_pretrained", out_dir=out_dir)
            unet = load_final(build_denoiser(vcfg), out_dir, ema=weights == "ema").eval().requires_grad_(False)
            imgs = sample_images(unet, noise_scheduler(vcfg), vae, scale, p.eval_samples, p.eval_inference_steps)
            q = pool_quality(judge(imgs), real_feats)
            rows.append({"variant": name, "overrides": " ".join(ov) or "(params file as is)", "weights": weights,
                         "steps": p.sweep_steps, "parameters": sum(x.numel() for x in unet.parameters()),
                         "samples": p.eval_samples, "ddim_steps": p.eval_inference_steps,
                         "fid": q["fid"], "kid_mean": q["kid_mean"], "precision": q["precision"],
                         "recall": q["recall"], "final_loss": res.last_loss})
            atomic_write_csv(pd.DataFrame(rows), out_csv)
            print(f"[sweep] {name} ({weights}): FID {q['fid']:.2f} KID {q['kid_mean']:.4f} "
                  f"P {q['precision']:.3f} R {q['recall']:.3f}", flush=True)
    return pd.DataFrame(rows)

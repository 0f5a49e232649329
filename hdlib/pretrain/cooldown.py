"""A cool-down branch of the long pre-training run (warmup-stable-decay): from one of the run's checkpoints
the learning rate falls linearly to 0, and the branch is judged like the run's own rows. The constant-lr
run (the trunk) is left as it is and can go on; any of its checkpoints can be cooled down later.

    python -m hdlib.pretrain.cooldown params/pretrain_demo.yaml --from-step 4000 --steps 600 [--variant deep_2] [key=value ...]

The branch trains in the study folder beside the trunk (models/denoiser_pretrained_cooldown_<from>_<steps>/,
resumable), is judged every pretrain.eval_every steps and at its end (the same samples, DDIM steps and
judge as the trunk's rows) and its rows go to metrics/pretrain_cooldown.csv, mirrored into
pretrain.committed_run/metrics/. The trunk's checkpoint at --from-step must be in the study folder or be
the committed one (a fresh clone seeds it from there). With --variant the branch leaves that long variant
(pretrain.long_variants) instead, and its rows name it in their `variant` column (empty for the trunk's).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd

from ..config import Config, load_config
from ..errors import ConfigError
from ..io import atomic_write_csv
from ..parallel.threads import torch_threads
from ..paths import StudyPaths
from ..study.context import device
from ..study.latent_models import build_denoiser, noise_scheduler
from ..study.preparation import prepare_data
from ..study.train import train_task
from ..training.weights import load_final
from .judges import judge_id
from .recipe import COOLDOWN_CURVE, branch_name, branch_variant, check_run_recipe, config_with, variant_name
from .curve import write_run_curve
from .resume import _copy_file, committed_rows, complete_checkpoints, seed_from_committed_checkpoint
from .run import check_pretrain_source, encoded_pool
from .samples import sample_images
from .scoring import ProvenanceScorer
from .variant import seed_variant, variant_config

CURVE = COOLDOWN_CURVE


def seed_branch(cfg: Config, start: int, steps: int, variant: str | None = None):
    """The branch's folder, holding the trunk's (or the variant's) checkpoint at `start` when it has none of its own yet."""
    paths = StudyPaths(cfg)
    out = paths.model(branch_name(start, steps, variant))
    if complete_checkpoints(out / "checkpoints"):
        return out
    src = paths.model(variant_name(variant) if variant else "denoiser_pretrained")
    trunk = {int(p.name.split("-")[1]): p for p in complete_checkpoints(src / "checkpoints")}
    if start not in trunk:
        raise ConfigError(f"--from-step {start}: the {'variant' if variant else 'run'} has no checkpoint at that step in "
                          f"{src}/checkpoints (it has {sorted(trunk) or 'none'})")
    shutil.copytree(trunk[start], out / "checkpoints" / trunk[start].name)
    return out


def cool_down(cfg: Config, start: int, steps: int, variant: str | None = None, vcfg: Config | None = None) -> pd.DataFrame:
    """Train the branch (resuming) and judge it; returns the branch's rows. `variant`: branch from that long
    variant, whose config is `vcfg` (hdlib.pretrain.variant.variant_config)."""
    vcfg = vcfg or cfg
    if steps < 1:
        raise ConfigError(f"--steps {steps}: a cool-down needs at least one step")
    p, paths = cfg.pretrain, StudyPaths(cfg)
    check_pretrain_source(cfg)
    with torch_threads(p.threads):  # restored after: a later run in this process keeps its count
        check_run_recipe(cfg)  # the branch lives in the trunk's folder: the same recipe
        if not paths.manifest("pool").exists():
            prepare_data(cfg)
        vae, scale = encoded_pool(cfg)
        seed_from_committed_checkpoint(cfg)
        if variant:
            seed_variant(cfg, vcfg, variant)  # its committed checkpoint, on a fresh clone
        out = seed_branch(cfg, start, steps, variant)
        scorer = ProvenanceScorer(cfg)
        path = committed_rows(cfg, CURVE)  # a fresh clone keeps the branches judged elsewhere
        rows = pd.read_csv(path).to_dict("records") if path.exists() else []
        done = {(branch_variant(r), int(r["from_step"]), int(r["cooldown_steps"]), int(r["step"])) for r in rows}
        end = start + steps
        for target in sorted(set(range(start + p.eval_every, end, p.eval_every)) | {end}):
            if (variant or "", start, steps, target) in done:
                continue
            chunk = config_with(vcfg, "diffusion.pretrain.max_steps", target)
            res = train_task(chunk, "denoiser_pretrained", out_dir=out, precision_may_change=True, keyed=False,
                             cooldown_start=start, cooldown_steps=steps)
            unet = build_denoiser(vcfg)
            load_final(unet, out, ema=True)
            imgs = sample_images(unet.eval().requires_grad_(False), noise_scheduler(cfg), vae, scale, p.eval_samples,
                                 p.eval_inference_steps, device=device(cfg))
            q = scorer(imgs)
            rows.append({"variant": variant or "", "from_step": start, "cooldown_steps": steps, "step": target, "samples": p.eval_samples,
                         "ddim_steps": p.eval_inference_steps, **q, "loss": res.last_loss, "train_s": res.wall_s,
                         "mixed_precision": cfg.study.mixed_precision, "judge": judge_id(cfg)})
            atomic_write_csv(pd.DataFrame(rows), path)
            if p.committed_run:
                _copy_file(path, Path(p.committed_run) / "metrics" / CURVE)  # committed: the branch's curve survives
                write_run_curve(p.committed_run, Path(p.export_dir) / "card.json" if p.export_dir else None)
            print(f"[pretrain] cool-down {variant + ' ' if variant else ''}{start}+{steps}, step {target}: judge FID {q['fid']:.2f} "
                  f"P {q['precision']:.3f} R {q['recall']:.3f} mixture TV {q['mixture_tv']:.3f}", flush=True)
        return pd.DataFrame([r for r in rows if (branch_variant(r), int(r["from_step"]), int(r["cooldown_steps"]))
                             == (variant or "", start, steps)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hdlib.pretrain.cooldown", description=__doc__.split("\n\n")[0])
    ap.add_argument("params")
    ap.add_argument("--from-step", type=int, required=True, help="the trunk's checkpoint to branch from")
    ap.add_argument("--steps", type=int, required=True, help="length of the linear decay of the lr to 0")
    ap.add_argument("--variant", help="branch from this long variant (pretrain.long_variants) instead of the run")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    if a.variant:
        cfg, vcfg, _ = variant_config(a.params, a.overrides, a.variant)
        rows = cool_down(cfg, a.from_step, a.steps, a.variant, vcfg)
    else:
        rows = cool_down(load_config(a.params, a.overrides), a.from_step, a.steps)
    print(rows[["step", "fid", "precision", "recall", "mixture_tv"]].to_string(index=False))


if __name__ == "__main__":
    main()

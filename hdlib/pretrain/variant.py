"""A long variant of the pre-training run: the run's recipe with a few settings changed (`pretrain.long_variants`,
'name: key=value ...'), trained from step 0 beside the trunk on the same pool latents and judged at the trunk's
steps by the trunk's judge, samples and seeds, so the two curves read on one scale. It answers what the short
recipe sweep cannot: whether a larger network overtakes the trunk once both have trained long.

    python -m hdlib.pretrain.variant params/pretrain_demo.yaml deep_2 --steps 8000 [key=value ...]

The variant trains in the study folder (models/denoiser_pretrained_variant_<name>/, resumable) in chunks of
pretrain.eval_every steps; its rows go to metrics/pretrain_variants.csv. Like the trunk, it outlives a machine:
after each judgement its latest checkpoint is mirrored into pretrain.committed_run/variants/<name>/ (with its
recipe key) and its rows into committed_run/metrics/, and a fresh clone resumes from there.
"""

from __future__ import annotations

import argparse
import json
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
from .curve import VARIANT_CURVE, write_run_curve
from .judges import judge_id
from .recipe import check_run_recipe, config_with, run_recipe_key, variant_name
from .resume import (
    CHECKPOINT,
    _copy_file,
    _copy_tree,
    committed_rows,
    complete_checkpoints,
    mirror_latest_checkpoint,
    seed_from_committed_checkpoint,
)
from .run import check_pretrain_source, encoded_pool
from .samples import sample_images
from .scoring import ProvenanceScorer
from .sweep import parse_recipe_variant

CURVE = VARIANT_CURVE


def variant_config(params: str, overrides, name: str) -> tuple[Config, Config, list[str]]:
    """(the run's config, the variant's, the variant's overrides); an unknown name is a one-line error."""
    cfg = load_config(params, list(overrides))
    declared = dict(parse_recipe_variant(v) for v in cfg.pretrain.long_variants)
    if name not in declared:
        raise ConfigError(f"pretrain.long_variants: no variant {name!r} in {params} "
                          f"(declared: {', '.join(declared) or 'none'})")
    return cfg, load_config(params, list(overrides) + declared[name]), declared[name]


def variant_dir(cfg: Config, name: str) -> Path:
    return StudyPaths(cfg).model(variant_name(name))


def _committed(cfg: Config, name: str) -> Path | None:
    return Path(cfg.pretrain.committed_run) / "variants" / name if cfg.pretrain.committed_run else None


def seed_variant(cfg: Config, vcfg: Config, name: str) -> int:
    """Before training: copy the committed variant's checkpoint in when it is further than this folder's.
    A committed variant of another recipe under this name is a one-line error. Returns the step copied in."""
    root = _committed(cfg, name)
    key = json.loads(json.dumps(run_recipe_key(vcfg)))
    if root is None or not (root / "run_key.json").exists():
        return 0
    if json.loads((root / "run_key.json").read_text()) != key:
        raise ConfigError(f"pretrain.long_variants: {root} holds a variant {name!r} of another recipe; rename one")
    theirs = complete_checkpoints(root / CHECKPOINT)
    ours = complete_checkpoints(variant_dir(cfg, name) / "checkpoints")
    if not theirs or (ours and int(ours[-1].name.split("-")[1]) >= int(theirs[-1].name.split("-")[1])):
        return 0
    _copy_tree(theirs[-1], variant_dir(cfg, name) / "checkpoints" / theirs[-1].name)
    if (root / "log.csv").exists():  # the loss curve of the steps trained elsewhere
        _copy_file(root / "log.csv", variant_dir(cfg, name) / "log.csv")
    return int(theirs[-1].name.split("-")[1])


def keep_committed_variant(cfg: Config, vcfg: Config, name: str) -> None:
    """After a judged chunk: mirror the variant's latest checkpoint (replacing the previous), its key and rows."""
    root = _committed(cfg, name)
    ours = complete_checkpoints(variant_dir(cfg, name) / "checkpoints")
    if root is None or not ours:
        return
    mirror_latest_checkpoint(ours[-1], root, run_recipe_key(vcfg))
    if (variant_dir(cfg, name) / "log.csv").exists():
        _copy_file(variant_dir(cfg, name) / "log.csv", root / "log.csv")
    _copy_file(StudyPaths(cfg).metrics_dir / CURVE, Path(cfg.pretrain.committed_run) / "metrics" / CURVE)
    write_run_curve(cfg.pretrain.committed_run, Path(cfg.pretrain.export_dir) / "card.json" if cfg.pretrain.export_dir else None)


def train_variant(params: str, name: str, steps: int, overrides=()) -> pd.DataFrame:
    """Train the variant (resuming) to `steps`, judged every pretrain.eval_every steps; returns its rows."""
    cfg, vcfg, ov = variant_config(params, overrides, name)
    if steps < 1:
        raise ConfigError(f"--steps {steps}: a variant needs at least one step")
    p, paths = cfg.pretrain, StudyPaths(cfg)
    check_pretrain_source(cfg)
    with torch_threads(p.threads):  # restored after: a later run in this process keeps its count
        check_run_recipe(cfg)  # it lives in the trunk's folder, on the trunk's latents and judge
        if not paths.manifest("pool").exists():
            prepare_data(cfg)
        vae, scale = encoded_pool(cfg)
        seed_from_committed_checkpoint(cfg)  # the trunk's curve rows, for the figure
        seed_variant(cfg, vcfg, name)
        scorer = ProvenanceScorer(cfg)
        path = committed_rows(cfg, CURVE)  # a fresh clone keeps the variants judged elsewhere
        rows = pd.read_csv(path).to_dict("records") if path.exists() else []
        done = {int(r["step"]) for r in rows if r["variant"] == name}
        for target in sorted(set(range(p.eval_every, steps, p.eval_every)) | {steps}):
            if target in done:
                continue
            chunk = config_with(vcfg, "diffusion.pretrain.max_steps", target)
            res = train_task(chunk, "denoiser_pretrained", out_dir=variant_dir(cfg, name), precision_may_change=True,
                             keyed=False)
            unet = load_final(build_denoiser(vcfg), variant_dir(cfg, name), ema=True)
            imgs = sample_images(unet.eval().requires_grad_(False), noise_scheduler(vcfg), vae, scale, p.eval_samples,
                                 p.eval_inference_steps, device=device(cfg))
            q = scorer(imgs)
            rows.append({"variant": name, "overrides": " ".join(ov), "parameters": sum(x.numel() for x in unet.parameters()),
                         "step": target, "samples": p.eval_samples, "ddim_steps": p.eval_inference_steps, **q,
                         "loss": res.last_loss, "train_s": res.wall_s, "mixed_precision": cfg.study.mixed_precision,
                         "judge": judge_id(cfg)})
            atomic_write_csv(pd.DataFrame(rows), path)
            keep_committed_variant(cfg, vcfg, name)
            print(f"[pretrain] variant {name}, step {target}: judge FID {q['fid']:.2f} P {q['precision']:.3f} "
                  f"R {q['recall']:.3f} mixture TV {q['mixture_tv']:.3f}", flush=True)
        return pd.DataFrame([r for r in rows if r["variant"] == name])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hdlib.pretrain.variant", description=__doc__.split("\n\n")[0])
    ap.add_argument("params")
    ap.add_argument("name", help="a variant of pretrain.long_variants")
    ap.add_argument("--steps", type=int, required=True, help="train (and judge) the variant up to this step")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    rows = train_variant(a.params, a.name, a.steps, a.overrides)
    print(rows[["step", "fid", "precision", "recall", "mixture_tv"]].to_string(index=False))


if __name__ == "__main__":
    main()

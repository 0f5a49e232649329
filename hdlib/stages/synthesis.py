"""Stage 04: class-specific synthesis and selective filtering.

- `Generation` loads a study's autoencoder, denoisers and latent classifiers once and
  makes latents or images of any generator (`hdlib.paths.GENERATORS`).
- `SelectiveFilter` is the paper's filter for one labeled subset: the real-only
  baseline classifier's features and confidence, class centroids of the real images,
  and a near-copy threshold calibrated per class on real validation images.
- `synthesize` fills a per-class quota exactly: it generates candidates in rounds,
  judges each round, and stops when every class has its quota of accepted images or
  hit the cap (a shortfall is recorded, never hidden). Images go to disk as PNGs with
  a manifest (the set is streamed from there later); a killed run resumes at the
  last finished round. A set is reused only if its request and the content of every
  model it used are unchanged.
- `choose_guidance` picks the guidance scale and the adaptation on the validation
  split (never on test).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import torch

from ..config import Config, TrainingConfig, parse_samplers
from ..augment import FeatureFilter, fill_quota
from ..errors import HDLibError
from ..io import atomic_write_csv, atomic_write_json, files_sha1
from ..paths import (GENERATORS, REPO_ROOT, StudyPaths, is_filtered, model_name, request_seeds, synthetic_set_name,
                     training_set_generator)
from .autoencoder import latent_scale, load_autoencoder
from .common import device, require
from .data import fraction_indices, fraction_labels, grid_fractions, manifest_hash, split_images, split_labels
from .diffusion import latent_shape, load_denoiser, noise_scheduler
from .guidance import load_latent_classifier


def weights_key(cfg: Config, name: str) -> str:
    """Content key of a trained model's final weights (or of the pre-trained folder)."""
    from .diffusion import uses_pretrained_unet

    if (name == "autoencoder" and cfg.pretrained.path) or (name == "denoiser_pretrained" and uses_pretrained_unet(cfg)):
        from ..pretrained import folder_sha256

        return folder_sha256(cfg.pretrained.path)
    return files_sha1([require(StudyPaths(cfg).model(name) / "final", f"model {name}")])


class Generation:
    """A study's generators, with every model loaded at most once.
    `adaptation` overrides `diffusion.grid_adaptation` (used when choosing it)."""

    def __init__(self, cfg: Config, adaptation: str | None = None):
        self.cfg = cfg
        self.adaptation = adaptation or cfg.diffusion.grid_adaptation
        self.device = device(cfg)
        self.scheduler = noise_scheduler(cfg)
        self.latent_shape = latent_shape(cfg)
        self.scale = latent_scale(cfg)
        self._vae = None
        self._models: dict[str, torch.nn.Module] = {}

    def denoiser_name(self, fraction: float, draw: int) -> str:
        a = self.adaptation
        if a == "none":
            return "denoiser_pretrained"
        return model_name("denoiser_adapted", fraction, a, draw if a == "labeled" else None)

    def models_of(self, generator: str, fraction: float, draw: int) -> dict:
        """{"denoiser": model name, "classifier": model name or None} of a generator."""
        clf = model_name("latent_classifier", fraction, draw=draw)
        if generator == "histodiffusion":
            return {"denoiser": self.denoiser_name(fraction, draw), "classifier": clf}
        if generator == "pretrained":
            return {"denoiser": self.denoiser_name(fraction, draw), "classifier": None}
        if generator == "scratch":
            return {"denoiser": model_name("denoiser_scratch", fraction, draw=draw), "classifier": clf}
        if generator == "classifier_free":
            return {"denoiser": model_name("denoiser_classifier_free", fraction, draw=draw), "classifier": None}
        if generator.startswith("denoiser_"):  # any named unconditional denoiser, unguided
            return {"denoiser": generator, "classifier": None}
        raise HDLibError(f"unknown generator {generator!r} (known: {', '.join(GENERATORS)})")

    def guidance_scale(self, generator: str, override: float | None = None) -> float:
        """The one place a generator's guidance scale is resolved."""
        s = self.cfg.sampling
        if generator == "classifier_free":
            return s.classifier_free_scale if override is None else float(override)
        if generator in ("pretrained",) or generator.startswith("denoiser_"):
            return 0.0
        return s.guidance_scale if override is None else float(override)

    def inputs_key(self, generator: str, fraction: float, draw: int) -> dict:
        """Content keys of every model a generator's samples depend on."""
        used = self.models_of(generator, fraction, draw)
        keys = {"autoencoder": weights_key(self.cfg, "autoencoder"),
                "denoiser": weights_key(self.cfg, used["denoiser"])}
        if used["classifier"] and self.guidance_scale(generator) > 0:
            keys["classifier"] = weights_key(self.cfg, used["classifier"])
        return keys

    def _model(self, name: str, loader):
        if name not in self._models:
            self._models[name] = loader().to(self.device)
        return self._models[name]

    @property
    def vae(self):
        if self._vae is None:
            self._vae = load_autoencoder(self.cfg).to(self.device)
        return self._vae

    def latents(self, generator: str, fraction: float, labels, seeds, guidance_scale: float | None = None,
                draw: int | None = None, progress: bool | None = None) -> torch.Tensor:
        from ..sampling import cfg_ddim_sample, guided_ddim_sample, guided_ddpm_sample, guided_dpm_solver_sample

        s, cfg = self.cfg.sampling, self.cfg
        draw = cfg.downstream.seeds[0] if draw is None else draw
        labels = torch.as_tensor(labels, dtype=torch.long)
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        kw = dict(latent_shape=self.latent_shape, batch_size=s.batch_size, device=self.device,
                  progress=cfg.study.progress if progress is None else progress)
        used = self.models_of(generator, fraction, draw)
        scale = self.guidance_scale(generator, guidance_scale)
        if generator == "classifier_free":
            unet = self._model(used["denoiser"], lambda: load_denoiser(cfg, used["denoiser"], conditional=True))
            return cfg_ddim_sample(unet, self.scheduler, labels, seeds, null_label=len(cfg.data.classes),
                                   cfg_scale=scale, num_inference_steps=s.num_inference_steps, eta=s.eta, **kw)
        unet = self._model(used["denoiser"], lambda: load_denoiser(cfg, used["denoiser"]))
        clf = None
        if used["classifier"] and scale > 0:
            clf = self._model(used["classifier"], lambda: load_latent_classifier(cfg, fraction, draw))
        sampler = {"ddim": guided_ddim_sample, "ddpm": guided_ddpm_sample,
                   "dpm_solver": guided_dpm_solver_sample}[s.method]
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
    Images may be uint8 tensors or datasets streamed from disk. `synthetic` = (images,
    labels) added at `synthetic_per_real` synthetic images per real one."""
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
        num_workers=cfg.data.num_workers, progress=cfg.study.progress if progress is None else progress)


def _cached_classifier(cfg: Config, name: str, backbone: str, fit, tcfg: TrainingConfig, data_key: str):
    """Train once with `fit()`; the cache is keyed by the training settings and by the
    content of the labeled images it learns from (`data_key`)."""
    from ..downstream import build_classifier
    from ..io import atomic_torch_save

    folder = StudyPaths(cfg).model(name)
    key = {"backbone": backbone, "train": vars(tcfg), "seed": cfg.study.seed, "eval_every": cfg.downstream.eval_every,
           "weights": cfg.downstream.pretrained_weights, "image_size": cfg.data.image_size, "data": data_key}
    key_path, path = folder / "settings.json", folder / "model.pt"
    model = build_classifier(backbone, num_classes=len(cfg.data.classes), image_size=cfg.data.image_size)
    if path.exists() and key_path.exists() and json.loads(key_path.read_text()) == json.loads(json.dumps(key)):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    trained, history = fit()
    atomic_torch_save(trained.state_dict(), path)
    atomic_write_csv(history, folder / "history.csv")
    atomic_write_json(key_path, key)
    return trained.eval()


def reference_classifier(cfg: Config):
    """Trained once on ALL the target's training labels (model selection on val): the
    independent judge of sample class and the feature space for FID/KID. It reports;
    it never chooses anything."""
    ds = cfg.downstream
    data_key = manifest_hash(cfg, "target_train") + manifest_hash(cfg, "target_val")
    return _cached_classifier(cfg, model_name("reference_classifier"), ds.reference_backbone, lambda: fit_image_classifier(
        cfg, ds.reference_backbone, ds.reference_train, split_images(cfg, "target_train"),
        split_labels(cfg, "target_train"), split_images(cfg, "target_val"), split_labels(cfg, "target_val"),
        seed=cfg.study.seed), ds.reference_train, data_key)


def baseline_classifier(cfg: Config, fraction: float, draw: int):
    """Real-only classifier on one labeled subset: its features and confidence drive filtering."""
    ds = cfg.downstream
    idx = fraction_indices(cfg, fraction, draw)
    data_key = manifest_hash(cfg, "target_train", fraction, draw) + manifest_hash(cfg, "target_val")
    return _cached_classifier(cfg, model_name("baseline_classifier", fraction, draw=draw), ds.backbone,
                              lambda: fit_image_classifier(
                                  cfg, ds.backbone, ds.train, split_images(cfg, "target_train", idx),
                                  split_labels(cfg, "target_train")[idx], split_images(cfg, "target_val"),
                                  split_labels(cfg, "target_val"), seed=cfg.study.seed + int(draw)),
                              ds.train, data_key)


class SelectiveFilter(FeatureFilter):
    """The paper's selective filter for one labeled subset (fraction, draw): nearest real
    class centroid = target class, baseline confidence >= tau, and no near copy of a
    labeled training image (threshold per class, calibrated on real validation images)."""

    def __init__(self, cfg: Config, fraction: float, draw: int):
        from ..downstream import extract_features
        from ..filtering import calibrate_delta

        self.cfg, self.fraction, self.draw = cfg, fraction, draw
        model, dev = baseline_classifier(cfg, fraction, draw), device(cfg)
        idx = fraction_indices(cfg, fraction, draw)
        real_f = extract_features(model, split_images(cfg, "target_train", idx), batch_size=128, device=dev)
        real_y = split_labels(cfg, "target_train")[idx]
        K = len(cfg.data.classes)
        if cfg.filtering.delta >= 0:
            delta = np.full(K, cfg.filtering.delta)
        else:
            val_f = extract_features(model, split_images(cfg, "target_val"), batch_size=128, device=dev)
            delta = calibrate_delta(real_f.numpy(), real_y.numpy(), val_f.numpy(),
                                    split_labels(cfg, "target_val").numpy(), K,
                                    percentile=cfg.filtering.delta_percentile)
        super().__init__(model, real_f, real_y, delta, cfg.filtering.tau, cfg.data.classes, train_index=idx,
                         device=dev)


# ---------------------------------------------------------------------------
# synthetic sets: quota filling, on disk, resumable
# ---------------------------------------------------------------------------

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


def synthesize(gen: Generation, generator: str, fraction: float, draw: int, quota, judge=None,
               guidance_scale: float | None = None, tag: str = "") -> pd.DataFrame:
    """Fill `quota` (an int or one per class) with `generator`'s images for label draw `draw`
    (`hdlib.augment.fill_quota`: rounds until every class has its quota of accepted images or
    reached sampling.max_candidates_factor x quota candidates; without a judge exactly the
    quota). Returns the set's manifest (one row per candidate, decision included); PNGs and
    manifest.csv are in synthetic/<name>/. Reused only when the request and the content of
    every model it used are unchanged; resumes after a kill at the last finished round."""
    cfg, s = gen.cfg, gen.cfg.sampling
    name = synthetic_set_name(generator, fraction, draw, tag)
    folder = StudyPaths(cfg).synthetic(name)
    scale = gen.guidance_scale(generator, guidance_scale)
    request = {"generator": generator, "fraction": fraction, "draw": draw, "guidance_scale": scale,
               "adaptation": gen.adaptation, "sampling": vars(s),
               "filtering": vars(cfg.filtering) if judge is not None else None,
               "labeled": manifest_hash(cfg, "target_train", fraction, draw) if judge is not None else None,
               "inputs": gen.inputs_key(generator, fraction, draw)}

    def sample(labels, seeds):
        if cfg.study.num_processes > 1:
            return _sharded(gen, generator, fraction, draw, labels, seeds, guidance_scale, folder)[1]
        return gen.decode(gen.latents(generator, fraction, labels, seeds, guidance_scale=guidance_scale, draw=draw))

    def seeds_of(c, start, n):  # candidate k of a class always gets the same seed
        return request_seeds(cfg, f"{name}/class{c}", start + n)[start:]

    meta = {"source": generator, "guidance_scale": scale, "model": gen.models_of(generator, fraction, draw)["denoiser"],
            "fraction": fraction, "draw": draw}
    return fill_quota(folder, list(cfg.data.classes), quota, sample, seeds_of, request, judge=judge,
                      cap_factor=s.max_candidates_factor, meta=meta)


def _sharded(gen: Generation, generator, fraction, draw, labels, seeds, guidance_scale, folder):
    """(latents, images) of one round generated by `study.num_processes` processes (`hdlib sample` under
    the launcher), each a contiguous shard of the request, merged back in request order."""
    from ..io import atomic_torch_save
    from ..launch import launch

    folder.mkdir(parents=True, exist_ok=True)
    req = folder / "round_request.pt"
    atomic_torch_save({"labels": torch.as_tensor(labels), "seeds": torch.as_tensor(seeds)}, req)
    for old in folder.glob("shard-*.pt"):
        old.unlink()
    args = ["-m", "hdlib", "sample", "--study-dir", str(gen.cfg.results_dir), "--generator", generator,
            "--fraction", repr(fraction), "--draw", str(draw), "--request", str(req),
            "--adaptation", gen.adaptation]
    if guidance_scale is not None:
        args += ["--guidance-scale", repr(guidance_scale)]
    launch(args, gen.cfg.study.num_processes, cwd=REPO_ROOT)
    shards = sorted(folder.glob("shard-*.pt"))
    z, images = merge_shards(shards)
    for p in shards + [req]:
        p.unlink()
    return z, images


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
    from ..datasets import ManifestImages

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


def synthetic_training_images(cfg: Config, training_set: str, fraction: float, ratio: float, draw: int):
    """The synthetic images added to one labeled subset for a grid cell: per class, the first
    round(ratio x real count) kept images (best ranked) of a filtered set, or the first
    candidates of an unfiltered one. Returns (dataset, labels, content key) or (None, None, "")."""
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


# ---------------------------------------------------------------------------
# choosing the guidance scale and the adaptation on the validation split
# ---------------------------------------------------------------------------

def validation_agreement(judge: SelectiveFilter, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose nearest validation-class centroid (baseline features) is their
    target class: class faithfulness judged by the validation split only."""
    from ..downstream import extract_features

    if not hasattr(judge, "_val_centroids"):
        vf = extract_features(judge.model, split_images(judge.cfg, "target_val"), batch_size=128, device=judge.device)
        vf = torch.nn.functional.normalize(vf, dim=1)
        vy = split_labels(judge.cfg, "target_val")
        judge._val_centroids = torch.stack([vf[vy == c].mean(0) for c in range(len(judge.cfg.data.classes))])
    f = torch.nn.functional.normalize(extract_features(judge.model, images, batch_size=128, device=judge.device), dim=1)
    return float((torch.cdist(f, judge._val_centroids).argmin(1) == torch.as_tensor(labels)).float().mean())


def choose_guidance(cfg: Config, fraction: float, draw: int, judge: SelectiveFilter,
                    reference=None) -> tuple[dict, pd.DataFrame]:
    """Guidance scale and adaptation with the best validation agreement (ties within 0.02:
    the smaller scale, then no adaptation). Returns (choice, table of every setting tried,
    with the reference classifier's accuracy for the report only)."""
    from ..downstream import predict

    s = cfg.sampling
    rows = []
    for adaptation in cfg.diffusion.adaptations:
        gen = Generation(cfg, adaptation)
        for scale in s.guidance_sweep:
            df = synthesize(gen, "histodiffusion", fraction, draw, s.sweep_per_class, guidance_scale=scale,
                            tag=f"select_{adaptation}_s{scale:g}")
            imgs, labels = _in_memory(cfg, df)
            row = {"adaptation": adaptation, "guidance_scale": scale, "n": len(df),
                   "validation_agreement": validation_agreement(judge, imgs, labels)}
            if reference is not None:
                _, pred = predict(reference, imgs, batch_size=128, device=device(cfg))
                row["reference_class_accuracy"] = float((pred == labels).float().mean())
            rows.append(row)
    table = pd.DataFrame(rows)
    best = table["validation_agreement"].max()
    near = table[table["validation_agreement"] >= best - 0.02].copy()
    near["pref"] = near["adaptation"].map(lambda a: 0 if a == "none" else 1)
    pick = near.sort_values(["guidance_scale", "pref"]).iloc[0]
    return {"adaptation": pick["adaptation"], "guidance_scale": float(pick["guidance_scale"]),
            "validation_agreement": float(pick["validation_agreement"])}, table


def compare_samplers(cfg: Config, fraction: float, draw: int, judge: SelectiveFilter, reference,
                     samplers=(("ddim", 25), ("dpm_solver", 10))) -> pd.DataFrame:
    """The chosen guidance (scale, adaptation) run by each (method, steps) sampler on one
    request (sampling.sweep_per_class per class, the same seeds for every sampler): validation
    agreement, the reference classifier's class accuracy, the Frechet distance to the
    validation images in the baseline classifier's feature space, and seconds per image.
    The samples are not kept."""
    import time

    from ..downstream import extract_features, predict
    from ..metrics import feature_stats, frechet_distance

    s = cfg.sampling
    K = len(cfg.data.classes)
    labels = torch.arange(K).repeat_interleave(s.sweep_per_class)
    seeds = torch.as_tensor(request_seeds(cfg, f"sampler_comparison_f{fraction:g}_s{draw}", len(labels)))
    val = extract_features(judge.model, split_images(cfg, "target_val"), batch_size=128, device=judge.device)
    saved = (s.method, s.num_inference_steps)
    rows = []
    try:
        for method, steps in samplers:
            s.method, s.num_inference_steps = method, steps
            gen = Generation(cfg)
            t = time.time()
            imgs = gen.decode(gen.latents("histodiffusion", fraction, labels, seeds, draw=draw, progress=False))
            took = time.time() - t
            _, pred = predict(reference, imgs, batch_size=128, device=device(cfg))
            feats = extract_features(judge.model, imgs, batch_size=128, device=judge.device)
            rows.append({"method": method, "steps": s.num_inference_steps, "n": len(labels),
                         "guidance_scale": s.guidance_scale, "adaptation": cfg.diffusion.grid_adaptation,
                         "validation_agreement": validation_agreement(judge, imgs, labels),
                         "reference_class_accuracy": float((pred == labels).float().mean()),
                         "frechet_to_validation": frechet_distance(*feature_stats(feats.double().numpy()),
                                                                   *feature_stats(val.double().numpy())),
                         "seconds_per_image": took / len(labels)})
    finally:
        s.method, s.num_inference_steps = saved
    return pd.DataFrame(rows)


@torch.no_grad()
def guided_faithfulness(cfg: Config, images: torch.Tensor, labels: torch.Tensor, reference_pred: torch.Tensor,
                        latent_classifier, gen: "Generation") -> list[dict]:
    """Per target class: the share of guided samples the reference classifier gives their target
    class, its most frequent other call, and the share the latent classifier that guided them
    gives their target class (on the re-encoded image, at t = 0). Where the latent classifier
    agrees and the reference does not, guidance satisfied the latent classifier without
    producing the class's appearance: the break is the latent classifier, not the sampler."""
    from ..models import encode_images

    z = encode_images(gen.vae, images, gen.scale, device=gen.device)
    t0 = torch.zeros(len(z), dtype=torch.long, device=gen.device)
    latent_classifier = latent_classifier.to(gen.device)
    latent_pred = torch.cat([latent_classifier(z[i:i + 64].to(gen.device), t0[i:i + 64]).argmax(1).cpu()
                             for i in range(0, len(z), 64)])  # batches: paper-size latents are 64x64
    labels, reference_pred = torch.as_tensor(labels), torch.as_tensor(reference_pred)
    rows = []
    for c, name in enumerate(cfg.data.classes):
        m = labels == c
        if not m.any():
            continue
        wrong = reference_pred[m & (reference_pred != c)]
        top = int(torch.mode(wrong).values) if len(wrong) else None
        rows.append({"class": name, "n": int(m.sum()),
                     "reference_accuracy": float((reference_pred[m] == c).float().mean()),
                     "reference_most_frequent_other": cfg.data.classes[top] if top is not None else "",
                     "reference_most_frequent_other_share": float((wrong == top).float().sum() / m.sum()) if top is not None else 0.0,
                     "latent_classifier_agreement": float((latent_pred[m] == c).float().mean())})
    return rows


def _in_memory(cfg: Config, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    from ..datasets import load_into_memory

    return load_into_memory(set_images(cfg, frame), num_workers=cfg.data.num_workers)


# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------

def synthesis_stage(cfg: Config, train_model=None) -> dict:
    """Choose guidance on validation, then fill every (generator, fraction, draw) set.
    `train_model(task, fraction, adaptation, draw)` trains a model the choice needs that
    stage 02 did not (adapted denoisers of other fractions and draws).
    Returns the metrics for metrics/04_synthesis.json."""
    from ..downstream import predict

    paths = StudyPaths(cfg)
    draws, fractions = list(cfg.downstream.seeds), grid_fractions(cfg)
    f0, d0 = min(cfg.downstream.fractions), draws[0]
    reference = reference_classifier(cfg)
    choice, sweep = None, pd.DataFrame()
    if cfg.sampling.select_on_validation:
        choice, sweep = choose_guidance(cfg, f0, d0, SelectiveFilter(cfg, f0, d0), reference)
        atomic_write_csv(sweep, paths.table("guidance_selection"))
        cfg.sampling.guidance_scale = choice["guidance_scale"]
        cfg.diffusion.grid_adaptation = choice["adaptation"]
    if cfg.diffusion.grid_adaptation == "labeled" and train_model is not None:
        for draw in draws:
            for f in fractions:
                train_model("denoiser_adapted", f, "labeled", draw)
    atomic_write_json(paths.metrics_dir / "04_choice.json",
                      {"guidance_scale": cfg.sampling.guidance_scale, "adaptation": cfg.diffusion.grid_adaptation,
                       "chosen_on": "validation" if choice else "params", "selection": choice})
    comparison = pd.DataFrame()
    if cfg.sampling.sampler_comparison:  # e.g. DPM-Solver++ in few steps vs DDIM, the same guidance
        comparison = compare_samplers(cfg, f0, d0, SelectiveFilter(cfg, f0, d0), reference,
                                      samplers=parse_samplers(cfg.sampling.sampler_comparison, "sampling.sampler_comparison"))
        atomic_write_csv(comparison, paths.table("sampler_comparison"))
    gen = Generation(cfg)
    acct, frames = [], {}
    for draw in draws:
        for f in fractions:
            judge = SelectiveFilter(cfg, f, draw)
            quota = quota_per_class(cfg, f, draw)
            for g in generators_needed(cfg):
                if g in ("scratch", "classifier_free") and f != f0:
                    continue  # ablation generators at the smallest fraction only (CPU budget; see README)
                name = synthetic_set_name(g, f, draw)
                df = synthesize(gen, g, f, draw, quota, judge=judge)
                frames[name] = df
                acct.append(accounting(cfg, df, quota, name).assign(generator=g, fraction=f, draw=draw))
    # the unguided pre-trained model, for the quality comparison only (its class label is the request's)
    n_quality = int(quota_per_class(cfg, f0, d0).max())
    synthesize(gen, "pretrained", f0, d0, n_quality)
    accounting_table = pd.concat(acct, ignore_index=True)
    atomic_write_csv(accounting_table, paths.table("synthesis_accounting"))

    # class faithfulness of the chosen setting, judged by the independent reference classifier
    hd = frames[synthetic_set_name("histodiffusion", f0, d0)]
    per_class = max(1, min(int(hd.groupby("label").size().min()), 64))
    first = hd.sort_values("index").groupby("label").head(per_class)
    imgs, labels = _in_memory(cfg, first)
    _, pred = predict(reference, imgs, batch_size=128, device=device(cfg))
    guided_acc = float((pred == labels).float().mean())
    from .guidance import load_latent_classifier

    faithfulness = guided_faithfulness(cfg, imgs, labels, pred, load_latent_classifier(cfg, f0, d0), gen)
    atomic_write_csv(pd.DataFrame(faithfulness), paths.table("guided_class_faithfulness"))
    near = {g: float(accounting_table[accounting_table["generator"] == g]["near_copies"].sum()
                     / max(1, accounting_table[accounting_table["generator"] == g]["candidates"].sum()))
            for g in accounting_table["generator"].unique()}
    metrics = {"guidance_scale": cfg.sampling.guidance_scale, "adaptation": cfg.diffusion.grid_adaptation,
               "selection": choice, "selection_table": sweep.to_dict(orient="records"),
               "guided_class_accuracy": guided_acc, "guided_class_accuracy_n": int(len(first)),
               "guided_class_faithfulness": faithfulness,
               "accounting": accounting_table.to_dict(orient="records"),
               "near_copy_rate": near, "delta_percentile": cfg.filtering.delta_percentile,
               "sampler_comparison": comparison.to_dict(orient="records")}
    return metrics


__all__ = ["Generation", "SelectiveFilter", "request_seeds", "synthesize", "synthetic_training_images",
           "reference_classifier", "baseline_classifier", "quota_per_class", "generators_needed",
           "choose_guidance", "compare_samplers", "guided_faithfulness", "synthesis_stage", "load_set", "set_images", "accounting", "merge_shards"]

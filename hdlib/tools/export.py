"""Models and synthetic datasets out of a study.

    python -m hdlib export results/<study> OUT
        the study's models as a diffusers folder (vae/, unet/, scheduler/, MANIFEST.sha256),
        plus latent_classifier/<name>/ (safetensors + config.json) and filter/<fraction>_s<draw>/
        (the selective filter: baseline classifier, real features, thresholds) for augment.
    python -m hdlib augment SOURCE OUT --per-class N [--fraction F] [--draw D] [--guidance-scale S]
    python -m hdlib augment EXPORT OUT --as-study
        SOURCE is a study folder or an exported folder. --as-study draws the study's own kept set at the
        smallest label fraction and first draw again from an export (its seeds, quota, cap and selection):
        on the same machine the images are the study's, bit for bit. Generates, filters and writes
        OUT/<class>/*.png (readable by torchvision.datasets.ImageFolder) and OUT/manifest.csv
        (class, seed, guidance scale, model, filter decision and score of every candidate).
        Resumable: work happens in OUT.partial/ and a re-run continues after the last round.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..config import LatentClassifierConfig
from ..errors import ConfigError
from ..io import atomic_write_csv, atomic_write_json
from ..models.builders import build_latent_classifier, decode_latents
from ..models.pretrained import (
    MANIFEST,
    export_pretrained,
    file_hashes,
    load_scheduler,
    load_unet,
    load_vae,
    read_latent_info,
)
from ..paths import StudyPaths, model_name, seeds_from
from ..sampling.filtering import FeatureFilter
from ..sampling.pipeline import ClassifierGuidance, GuidedLatentPipeline
from ..sampling.quota import fill_quota
from ..study.classifiers import SelectiveFilter
from ..study.context import config_from_results
from ..study.decisions import chosen_generation
from ..study.latent_models import (
    latent_shape,
    load_denoiser,
    load_latent_classifier,
    noise_scheduler,
)
from ..study.latents import latent_scale, load_autoencoder
from ..study.splits import first_draw, grid_fractions, smallest_fraction
from ..study.synthetic_sets import set_recipe

EXPORT_INFO = "hdlib_export.json"


def export_study(study_dir: str | Path, out: str | Path) -> Path:
    """A study's trained models as a diffusers folder (vae/, unet/, scheduler/) plus
    latent_classifier/<name>/ (weights + config) and filter/<fraction>_s<draw>/ for augment."""
    from safetensors.torch import save_model

    cfg = config_from_results(study_dir)
    out = Path(out)
    f0, d0 = smallest_fraction(cfg), first_draw(cfg)
    gen = chosen_generation(cfg)
    unet = load_denoiser(cfg, gen.denoiser_name(f0, d0))
    info = {"study": str(study_dir), "classes": list(cfg.data.classes), "image_size": cfg.data.image_size,
            "latent_shape": list(latent_shape(cfg)), "guidance_scale": gen.sampling.guidance_scale,
            "sampling": vars(gen.sampling), "denoiser": gen.denoiser_name(f0, d0), "latent_classifiers": [],
            "filters": []}
    vae, sched = load_autoencoder(cfg), noise_scheduler(cfg)
    export_pretrained(out, vae, unet.cpu(), sched, scaling_factor=latent_scale(cfg))
    GuidedLatentPipeline(unet, sched, vae).save_config(out)  # model_index.json: GuidedLatentPipeline.from_pretrained(out)
    C, _, S = latent_shape(cfg)
    for draw in cfg.downstream.seeds:
        for f in grid_fractions(cfg):
            name = model_name("latent_classifier", f, draw=draw)
            if not (StudyPaths(cfg).model(name) / "final").exists():
                continue
            clf = load_latent_classifier(cfg, f, draw)
            folder = out / "latent_classifier" / name
            folder.mkdir(parents=True, exist_ok=True)
            save_model(clf, str(folder / "model.safetensors"))
            atomic_write_json(folder / "config.json", {**vars(cfg.latent_classifier), "train": None,
                                                       "in_channels": C, "sample_size": S,
                                                       "classes": list(cfg.data.classes), "fraction": f,
                                                       "draw": draw})
            info["latent_classifiers"].append(name)
            judge = SelectiveFilter(cfg, f, draw)
            judge.save(out / "filter" / f"{f:g}_s{draw}", cfg.downstream.backbone, cfg.data.image_size)
            info["filters"].append(f"{f:g}_s{draw}")
    if f"{f0:g}_s{d0}" in info["filters"]:  # how the study filled its kept set there: augment --as-study redraws it
        info["study_set"] = set_recipe(cfg, "histodiffusion", f0, d0)
    atomic_write_json(out / EXPORT_INFO, info)

    (out / MANIFEST).write_text("".join(f"{v}  {k}\n" for k, v in file_hashes(out).items()))
    return out


def _export_sampler(source: Path, fraction: float, draw: int, guidance_scale: float | None, device: str):
    """(sample(labels, seeds) -> images, judge, description) from an exported folder."""
    from safetensors.torch import load_model

    info = json.loads((source / EXPORT_INFO).read_text())
    name = f"latent_classifier_f{fraction:g}_s{draw}"
    if name not in info["latent_classifiers"]:
        raise ConfigError(f"{source}: no latent classifier for fraction {fraction:g}, draw {draw} "
                          f"(exported: {', '.join(info['latent_classifiers'])})")
    c = json.loads((source / "latent_classifier" / name / "config.json").read_text())
    lc = LatentClassifierConfig(**{k: v for k, v in c.items() if k in LatentClassifierConfig.__dataclass_fields__
                                   and k != "train"})
    # its own denoiser instance: loading the classifier's weights must not touch the sampler's
    skeleton = load_unet(source) if lc.backbone == "pretrained_unet" else None
    clf = build_latent_classifier(lc, c["in_channels"], c["sample_size"], len(c["classes"]), encoder_unet=skeleton)
    load_model(clf, str(source / "latent_classifier" / name / "model.safetensors"))
    vae = load_vae(source).to(device)
    pipe = GuidedLatentPipeline(load_unet(source).to(device), load_scheduler(source))
    scale = read_latent_info(source)["scaling_factor"]
    s = info["sampling"]  # the study's chosen sampler, steps, guidance scale and interval
    gs = info["guidance_scale"] if guidance_scale is None else guidance_scale
    cond_fn = ClassifierGuidance(clf.to(device).eval())

    def sample(labels, seeds):
        z = pipe(labels, seeds, method=s["method"], num_inference_steps=s["num_inference_steps"], eta=s["eta"],
                 cond_fn=cond_fn, guidance_scale=gs, guidance_interval=tuple(s.get("guidance_interval") or ()) or None,
                 latent_shape=tuple(info["latent_shape"]), batch_size=s["batch_size"], device=device,
                 progress=False)
        return decode_latents(vae, z, scale, device=device)

    judge = FeatureFilter.load(source / "filter" / f"{fraction:g}_s{draw}", device=device)
    return sample, judge, {"model": str(source), "guidance_scale": gs,
                           "sampler": f"{s['method']}:{s['num_inference_steps']}"}, info["classes"]


def _study_set(source: Path) -> dict:
    info = json.loads((source / EXPORT_INFO).read_text()) if (source / EXPORT_INFO).exists() else None
    if info is None or "study_set" not in info:
        raise ConfigError(f"{source}: --as-study needs an export that records the study's kept set "
                          f"({EXPORT_INFO} 'study_set'; made by `hdlib export` from a study that filtered one)")
    return info["study_set"]


def _source_sampler(source: Path, fraction: float | None, draw: int | None, guidance_scale: float | None,
                    device: str) -> tuple:
    """(sample, judge, meta, classes, fraction, draw, seed_tag) of an export or a study folder; fraction
    and draw default to the export's first latent classifier, or the study's smallest fraction and first draw."""
    if (source / EXPORT_INFO).exists():
        info = json.loads((source / EXPORT_INFO).read_text())
        first = info["latent_classifiers"][0] if info["latent_classifiers"] else ""
        fraction = fraction if fraction is not None else float(first.split("_f")[1].split("_s")[0])
        draw = draw if draw is not None else int(first.rsplit("_s", 1)[1])
        sample, judge, meta, classes = _export_sampler(source, fraction, draw, guidance_scale, device)
        seed_tag = f"augment/{source.resolve().name}"
    elif (source / "config.json").exists():
        cfg = config_from_results(source)
        fraction = smallest_fraction(cfg) if fraction is None else fraction
        draw = first_draw(cfg) if draw is None else draw
        gen = chosen_generation(cfg)
        judge = SelectiveFilter(cfg, fraction, draw)
        classes = list(cfg.data.classes)

        def sample(labels, seeds):
            return gen.decode(gen.latents("histodiffusion", fraction, labels, seeds, guidance_scale=guidance_scale,
                                          draw=draw))
        meta = {"model": gen.models_of("histodiffusion", fraction, draw)["denoiser"],
                "guidance_scale": gen.guidance_scale("histodiffusion", guidance_scale),
                "sampler": f"{gen.sampling.method}:{gen.sampling.num_inference_steps}"}
        seed_tag = f"augment/{cfg.study.name}"
    else:
        raise ConfigError(f"{source}: neither a study folder (config.json) nor an exported folder ({EXPORT_INFO})")
    return sample, judge, meta, classes, fraction, draw, seed_tag


def augment_dataset(source: str | Path, out: str | Path, per_class: int | None, fraction: float | None = None,
            draw: int | None = None, guidance_scale: float | None = None, filtered: bool = True,
            device: str = "cpu", as_study: bool = False) -> Path:
    """A class-folder dataset of `per_class` filtered synthetic images per class:
    OUT/<class>/*.png and OUT/manifest.csv (class, seed, guidance scale, model, filter
    decision and score, for every candidate). Resumable: generation works in OUT.partial/.
    `as_study`: the study's own kept set of an export (per class its quota, the study's seeds,
    cap and selection), instead of `per_class` images of augment's own seeds."""
    import hashlib

    source, out = Path(source), Path(out)
    recipe = _study_set(source) if as_study else None
    if recipe is not None:
        fraction, draw, per_class, guidance_scale = recipe["fraction"], recipe["draw"], recipe["quota"], None
    elif per_class is None or per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {per_class}")
    sample, judge, meta, classes, fraction, draw, seed_tag = _source_sampler(source, fraction, draw, guidance_scale,
                                                                             device)
    request = {"source": str(source.resolve()), "fraction": fraction, "draw": draw, **meta}
    request = json.loads(json.dumps({**request, "per_class": per_class, "filtered": filtered}, default=str))
    done = out / "request.json"
    if (out / "manifest.csv").exists() and done.exists() and json.loads(done.read_text()).get("request") == request:
        return out  # already written for exactly this request
    work = out.parent / f"{out.name}.partial"  # outside OUT: ImageFolder treats every sub-folder as a class
    base = int(hashlib.sha1(seed_tag.encode()).hexdigest()[:8], 16)

    def seeds_of(c, start, n):  # candidate k of class c always gets the same seed
        if recipe is not None:  # the study's own
            return seeds_from(recipe["seed_bases"][c], start, n)
        return (base * 1_000_003 + c * 10_000_019 + start + np.arange(n)) % 2**62

    how = ({} if recipe is None else
           {"cap_factor": recipe["cap_factor"], "selection": recipe["selection"], "seed": recipe["selection_seed"]})
    df = fill_quota(work, classes, per_class, sample, seeds_of, request, judge=judge if filtered else None,
                    meta={"fraction": fraction, "draw": draw, **meta}, **how)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for c in classes:
        (out / c).mkdir()
    files = []
    for _, r in df.iterrows():
        dest = ""
        if r["kept"]:
            dest = str(Path(r["class_name"]) / Path(r["path"]).name)
            shutil.copy2(r["path"], out / dest)
        files.append(dest)
    manifest = df.assign(file=files, score=df["distance"])[
        ["file", "class_name", "seed", "guidance_scale", "sampler", "model", "decision", "score", "confidence",
         "nn_distance", "fraction", "draw"]].rename(columns={"class_name": "class"})
    atomic_write_csv(manifest, out / "manifest.csv")
    quota = np.broadcast_to(np.asarray(per_class), (len(classes),))
    shortfall = {c: int(q - df[(df["class_name"] == c) & df["kept"]].shape[0]) for c, q in zip(classes, quota)}
    atomic_write_json(done, {"request": request, "shortfall": {k: v for k, v in shortfall.items() if v > 0}})
    shutil.rmtree(work, ignore_errors=True)
    if any(shortfall.values()):  # written and reported, never padded
        print(f"{out}: short of its quota of kept images in: "
              + ", ".join(f"{k} (-{v})" for k, v in shortfall.items() if v > 0) + " (cap reached; see manifest.csv)")
    return out

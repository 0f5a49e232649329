"""How long the target's unlabeled adaptation should train (the generator issue's item 5).

    python -m hdlib.tools.adaptation_length results/default --steps 0 300 1000 3000 [--draws 0 1 2]
        [--unguided 256] [--out results/adaptation_length] [--set diffusion.loss=l2 ...] [--name NAME] [--interval T_LOW T_HIGH]

For each length the pre-trained denoiser is fine-tuned on the target's unlabeled training images
(`target_unlabeled`: the study's `diffusion.adapt` with only `max_steps` replaced, and any `--set` diffusion
settings such as the training objective; 0 = not adapted), then
judged at the study's primary cell with the guidance, interval and sampler stage 04 chose:
- the target's look: the Frechet distance, in each draw's real-only classifier's features, of unguided
  samples (the same seeds for every length) and of the guided candidates to the target's unlabeled
  training images (the measure stage 04's choice uses), and the same in the reference classifier's
  features (trained on every labeled target image: an instrument that sees the target's tissue);
- class faithfulness: the independent reference classifier's accuracy on the images the selective filter
  **kept**, balanced over classes, and on every candidate.

The study folder is only read. Each length works in `<out>/work/<name>/steps-N/<study>/` (links to the study's
manifests, caches, decisions and models, its own adapted denoiser and synthetic sets), so every length has
the study's names and seeds: the rows are paired. Training resumes from its last checkpoint and a filled set
is reused, so a stopped run loses at most one checkpoint interval. Writes `<out>/<name>/`
adaptation_length.csv (one row per length and draw), adaptation_length.json (pooled per length) and two
figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Config, check_guidance_interval
from ..data.streaming import load_into_memory
from ..errors import ConfigError, HDLibError
from ..evaluation import plots
from ..evaluation.downstream import extract_features
from ..evaluation.metrics import frechet_distance
from ..io import atomic_write_csv, atomic_write_json
from ..paths import StudyPaths, model_name, request_seeds
from ..study.classifiers import SelectiveFilter, reference_classifier
from ..study.context import config_from_results, device
from ..study.decisions import guidance, primary_fraction
from ..study.faithfulness import (
    class_faithfulness,
    frechet_to_target,
    target_features,
    target_rows,
)
from ..study.generation import Generation
from ..study.latent_models import noise_scheduler
from ..study.splits import draws_for, first_draw, split_images
from ..study.synthetic_sets import _in_memory, quota_per_class, synthesize
from ..study.train import train_task

ADAPTED = model_name("denoiser_adapted", adaptation="target_unlabeled")
SHARED = ("manifests", "cache", "decisions", "metrics")  # what every length reads from the study as it is


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        return
    os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())


def length_study(study_dir: Path, work: Path, steps: int, overrides=()) -> Config:
    """The study's config with `diffusion.adapt.max_steps` = steps (and `overrides`), in its own folder of links."""
    study_dir = Path(study_dir)
    root = (work / f"steps-{steps}").resolve()
    cfg = config_from_results(study_dir, [*overrides, f"study.results_root={root}",
                                          f"diffusion.adapt.max_steps={max(steps, 1)}"])
    dst = StudyPaths(cfg).root
    (dst / "models").mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        _link(study_dir / name, dst / name)
    for model in sorted((study_dir / "models").iterdir()):
        if model.name != ADAPTED:
            _link(model, dst / "models" / model.name)
    atomic_write_json(StudyPaths(cfg).config_json, cfg.to_dict())
    return cfg


def adapt(cfg: Config, study_dir: Path, steps: int) -> float:
    """Train (or resume) the length's adapted denoiser; the study's own when its settings are the study's.
    Returns the training's seconds as its log recorded them (0 when not adapted)."""
    if steps == 0:
        return 0.0
    own, mine = Path(study_dir) / "models" / ADAPTED, StudyPaths(cfg).model(ADAPTED)
    study = config_from_results(study_dir)
    if study.diffusion == cfg.diffusion and (own / "final").exists():
        _link(own, mine)
    elif not _trained(mine, steps):
        train_task(cfg, "denoiser_adapted", adaptation="target_unlabeled", progress=True)
    log = pd.read_csv(mine / "log.csv")
    return float(log["elapsed_s"].iloc[-1])


def _trained(folder: Path, steps: int) -> bool:
    """A finished training of this length: its final weights and a log that reached the last step."""
    log = folder / "log.csv"
    return (folder / "final").exists() and log.exists() and int(pd.read_csv(log)["step"].max()) >= steps


def judged_guidance(cfg: Config, interval: list[int] | None = None) -> dict:
    """The guidance every length is judged with: stage 04's decision, or it with another guidance interval
    (to repeat a measurement made while the study had decided another one)."""
    g = guidance(cfg)
    return {"scale": g.scale, "interval": list(g.interval if interval is None else interval), "method": g.method,
            "steps": g.steps}


def _generation(cfg: Config, steps: int, g: dict) -> Generation:
    return Generation(cfg, "none" if steps == 0 else "target_unlabeled", g["scale"], sampler=(g["method"], g["steps"]),
                      guidance_interval=g["interval"])


def _features(cfg: Config, model, images) -> np.ndarray:
    return extract_features(model, images, batch_size=128, device=device(cfg)).double().numpy()


@torch.no_grad()
def judge_length(cfg: Config, steps: int, draws: list[int], unguided: int, g: dict) -> tuple[list[dict], dict, dict]:
    """One row per draw (the length's measures), the class faithfulness pooled over the draws as stage 04
    pools it (hdlib.study.faithfulness.class_faithfulness: balanced over classes), and the images its
    figures show."""
    gen, f0, reference = _generation(cfg, steps, g), primary_fraction(cfg), reference_classifier(cfg)
    K = len(cfg.data.classes)
    labels = torch.arange(K).repeat(unguided // K + 1)[:unguided]  # an unguided sample ignores its label
    plain = gen.decode(gen.latents("pretrained", f0, labels, request_seeds(cfg, "adaptation_length_unguided", unguided),
                                   draw=draws[0]))
    plain_ref = _features(cfg, reference, plain)
    rows, frames, shown = [], [], {"unguided": plain}
    for draw in draws:
        judge = SelectiveFilter(cfg, f0, draw)
        target_f = target_features(cfg, judge, f0, draw)
        target_ref = _features(cfg, reference, split_images(cfg, "target_train", target_rows(cfg, f0, draw)))
        frame = synthesize(gen, "histodiffusion", f0, draw, quota_per_class(cfg, f0, draw), judge=judge)
        candidates, _ = _in_memory(cfg, frame.sort_values("index"))
        faith = class_faithfulness(cfg, [(draw, frame)], reference, gen)
        frames.append((draw, frame))
        kept = frame[frame["kept"]]
        rows.append({"adaptation_steps": steps, "draw": draw, "fraction": f0,
                     "frechet_to_target_unguided": frechet_to_target(judge, plain, target_f),
                     "frechet_to_target_candidates": frechet_to_target(judge, candidates, target_f),
                     # a second instrument: the reference classifier, trained on every labeled target image
                     "frechet_to_target_unguided_reference": frechet_distance(target_ref, plain_ref),
                     "frechet_to_target_candidates_reference": frechet_distance(target_ref, _features(cfg, reference, candidates)),
                     "kept_class_accuracy": faith["kept"]["accuracy"], "kept": faith["kept"]["n"],
                     "candidate_class_accuracy": faith["candidates"]["accuracy"], "candidates": len(frame),
                     "classes_without_kept_images": len(faith["kept"]["classes_without_images"]),
                     "kept_class_accuracy_per_class": {r["class"]: r["reference_accuracy"]
                                                       for r in faith["kept"]["per_class"]}})
        if draw == draws[0]:
            shown["kept"] = _in_memory(cfg, kept.sort_values(["label", "rank"]))
    return rows, class_faithfulness(cfg, frames, reference, gen), shown


def summarize(table: pd.DataFrame, pooled: dict) -> list[dict]:
    """Per length: the distances averaged over draws, and the class faithfulness pooled over them
    (`pooled[steps]`, judge_length's), with its per-class figures."""
    out = []
    for steps, g in table.groupby("adaptation_steps", sort=True):
        faith = pooled[int(steps)]
        out.append({"adaptation_steps": int(steps), "draws": len(g),
                    "train_seconds": float(g["train_seconds"].iloc[0]),
                    **{c: float(g[c].mean()) for c in ("frechet_to_target_unguided", "frechet_to_target_candidates",
                                                       "frechet_to_target_unguided_reference",
                                                       "frechet_to_target_candidates_reference") if c in g},
                    "kept_class_accuracy": faith["kept"]["accuracy"], "kept": faith["kept"]["n"],
                    "kept_class_accuracy_per_class": {r["class"]: r["reference_accuracy"] for r in faith["kept"]["per_class"]},
                    "classes_without_kept_images": faith["kept"]["classes_without_images"],
                    "candidate_class_accuracy": faith["candidates"]["accuracy"], "candidates": faith["candidates"]["n"]})
    return out


def check_request(study_dir: Path, steps: list[int], draws: list[int] | None,
                  overrides=()) -> tuple[Config, list[int]]:
    """Every argument checked before any training: the study's decisions, lengths, draws and overrides."""
    if not (Path(study_dir) / "config.json").exists():
        raise ConfigError(f"{study_dir}: not a study folder (no config.json); run the study first")
    if bad := [o for o in overrides if not o.startswith("diffusion.")]:
        raise ConfigError(f"--set {bad[0]}: only diffusion.* settings (how the adaptation trains) may change")
    cfg = config_from_results(study_dir, overrides)
    guidance(cfg), primary_fraction(cfg)  # a missing decision is an error here, not after an hour of training
    if any(s < 0 for s in steps) or len(set(steps)) != len(steps):
        raise ConfigError(f"--steps {steps}: lengths must be distinct and >= 0 (0 = not adapted)")
    known = draws_for(cfg, primary_fraction(cfg), primary_fraction(cfg))
    draws = known[:3] if draws is None else draws
    if unknown := [d for d in draws if d not in known]:
        raise ConfigError(f"--draws {unknown}: the study has draws {known} at its primary cell")
    if not (Path(study_dir) / "models").is_dir():
        raise HDLibError(f"{study_dir}/models: missing; the study's models are not on this machine (make study)")
    return cfg, draws


def run(study_dir: Path, steps: list[int], draws: list[int] | None, unguided: int, out: Path,
        overrides=(), name: str | None = None, interval: list[int] | None = None) -> pd.DataFrame:
    """Measure every length; the results go to <out>/<name> (default: the study's name), the work to
    <out>/work/<name>/."""
    cfg0, draws = check_request(study_dir, steps, draws, overrides)
    g = judged_guidance(cfg0, interval)
    check_guidance_interval(g["interval"], int(noise_scheduler(cfg0).config.num_train_timesteps), "--interval")
    name = name or cfg0.study.name
    dest = out / name
    dest.mkdir(parents=True, exist_ok=True)
    rows, pooled, shown = [], {}, {}
    for n in sorted(steps):
        cfg = length_study(study_dir, out / "work" / name, n, overrides)
        t = time.time()
        seconds = adapt(cfg, study_dir, n)
        print(f"adaptation {n} steps: trained ({seconds:.0f} s in its log); judging ...", flush=True)
        got, pooled[n], shown[n] = judge_length(cfg, n, draws, unguided, g)
        rows += [{**r, "train_seconds": seconds} for r in got]
        print(f"adaptation {n} steps: done in {time.time() - t:.0f} s", flush=True)
        table = pd.DataFrame(rows)
        atomic_write_csv(table.drop(columns="kept_class_accuracy_per_class"), dest / "adaptation_length.csv")
    atomic_write_json(dest / "adaptation_length.json", {
        "study": str(study_dir), "overrides": list(overrides), "primary_fraction": primary_fraction(cfg0), "draws": draws,
        "unguided_samples": unguided, "guidance": g, "adapt": vars(cfg0.diffusion.adapt),
        "objective": {k: getattr(cfg0.diffusion, k) for k in ("loss", "snr_gamma", "timestep_sampling", "lognormal_mean",
                                                             "lognormal_std")},
        "target_images": len(split_images(cfg0, "target_train")),
        "per_length": summarize(table, pooled), "rows": rows})
    _figures(cfg0, pd.DataFrame(summarize(table, pooled)), shown, dest)
    return table


def _figures(cfg: Config, summary: pd.DataFrame, shown: dict, dest: Path) -> None:
    fig = plots.adaptation_length(summary)
    fig.savefig(dest / "adaptation_length.png", dpi=120, bbox_inches="tight")
    rows = target_rows(cfg, primary_fraction(cfg), first_draw(cfg), 12)  # spread over the class-ordered rows
    real, _ = load_into_memory(split_images(cfg, "target_train", rows), num_workers=cfg.data.num_workers)
    grid = {"target (real, unlabeled)": real, **{f"{n} steps": s["unguided"] for n, s in shown.items()}}
    fig = plots.image_rows(grid, n=12, title="Unguided samples per adaptation length (the same seeds)")
    fig.savefig(dest / "adaptation_length_samples.png", dpi=120, bbox_inches="tight")
    kept = {f"{n} steps": s["kept"] for n, s in shown.items() if "kept" in s}
    if kept:
        fig = plots.comparison_grid(kept, cfg.data.classes, n=3,
                                    title="Kept guided images per class and adaptation length (first draw)")
        fig.savefig(dest / "adaptation_length_kept.png", dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hdlib.tools.adaptation_length", description=__doc__.split("\n")[0])
    ap.add_argument("study_dir", type=Path)
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 300, 1000, 3000])
    ap.add_argument("--draws", type=int, nargs="+", default=None, help="label draws at the primary cell (default: first 3)")
    ap.add_argument("--unguided", type=int, default=256, help="unguided samples per length")
    ap.add_argument("--out", type=Path, default=Path("results/adaptation_length"))
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="diffusion.* settings every length trains with (e.g. the pre-trained model's own objective)")
    ap.add_argument("--name", help="the measurement's folder under --out (default: the study's name)")
    ap.add_argument("--interval", type=int, nargs="*", default=None, metavar="T",
                    help="judge with this guidance interval (T_LOW T_HIGH, or none for every step) instead of stage 04's")
    args = ap.parse_args(argv)
    try:
        run(args.study_dir, args.steps, args.draws, args.unguided, args.out, args.set, args.name, args.interval)
    except HDLibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

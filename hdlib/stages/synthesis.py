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
- `choose_guidance` picks the guidance scale, the adaptation and (from
  `sampling.guidance_interval_sweep`) the guidance interval on the validation split (never
  on test).
"""

from __future__ import annotations

import time

import pandas as pd
import torch

from ..config import Config, parse_samplers
from ..evaluation.downstream import extract_features, predict
from ..evaluation.metrics import frechet_distance
from ..io import atomic_write_csv
from ..paths import StudyPaths, request_seeds, synthetic_set_name
from ..study.classifiers import SelectiveFilter, reference_classifier
from ..study.context import device
from ..study.decisions import primary_fraction, record
from ..study.faithfulness import class_faithfulness, frechet_to_target, target_features
from ..study.generation import Generation
from ..study.splits import (
    draws_for,
    first_draw,
    grid_fractions,
    smallest_fraction,
    validation_set,
)
from ..study.synthetic_sets import (
    _in_memory,
    accounting,
    generators_needed,
    quota_per_class,
    synthesize,
)

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "study.mixed_precision", "data.classes", "data.image_size",
               "data.labeled_val_every", "autoencoder", "pretrained", "diffusion", "latent_classifier",
               "sampling", "filtering", "downstream"],
    "files": ["models/", "grid/", "metrics/03_guidance.json"],
}


def validation_agreement(judge: SelectiveFilter, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose nearest validation-class centroid (baseline features) is their
    target class: class faithfulness judged by the judge's labeled validation images only."""
    if not hasattr(judge, "_val_centroids"):
        vx, vy, _ = validation_set(judge.cfg, judge.fraction, judge.draw)
        vf = extract_features(judge.model, vx, batch_size=128, device=judge.device)
        vf = torch.nn.functional.normalize(vf, dim=1)
        judge._val_centroids = torch.stack([vf[vy == c].mean(0) for c in range(len(judge.cfg.data.classes))])
    f = torch.nn.functional.normalize(extract_features(judge.model, images, batch_size=128, device=judge.device), dim=1)
    return float((torch.cdist(f, judge._val_centroids).argmin(1) == torch.as_tensor(labels)).float().mean())


def _interval_tag(interval) -> str:
    return f"_t{interval[0]}-{interval[1]}" if interval else "_tall"


AGREEMENT_MARGIN = 0.05  # class agreement first; within this margin of the best, the target's look decides


def choose_guidance(cfg: Config, fraction: float, draw: int, judge: SelectiveFilter,
                    reference=None) -> tuple[dict, pd.DataFrame]:
    """Guidance scale, adaptation and guidance interval (each of `sampling.guidance_interval_sweep`,
    or only `sampling.guidance_interval` when that is empty), judged by two things the draw may
    use: class agreement with its labeled validation images, and the look of the target (Frechet
    distance, in the baseline classifier's features, of the samples to the target's unlabeled
    training images). Among the settings within AGREEMENT_MARGIN of the best agreement, the one
    closest to the target's look wins (ties: the smaller scale, then no adaptation, then the
    configured interval). Scale 0 is run once per adaptation (without guidance the interval
    changes nothing). Returns (choice, table of every setting tried, with the reference
    classifier's accuracy for the report only); `guidance_interval` [] means every step."""

    s = cfg.sampling
    target_f = target_features(cfg, judge, fraction, draw)
    swept = bool(s.guidance_interval_sweep)
    intervals = [list(iv) for iv in s.guidance_interval_sweep] if swept else [list(s.guidance_interval)]
    rows = []
    for adaptation in cfg.diffusion.adaptations:
        for k, interval in enumerate(intervals):
            gen = Generation(cfg, adaptation, guidance_interval=interval)
            for scale in s.guidance_sweep:
                if swept and scale == 0 and k > 0:
                    continue
                tag = f"select_{adaptation}_s{scale:g}" + (_interval_tag(interval) if swept and scale != 0 else "")
                df = synthesize(gen, "histodiffusion", fraction, draw, s.sweep_per_class, guidance_scale=scale, tag=tag)
                imgs, labels = _in_memory(cfg, df)
                row = {"adaptation": adaptation, "guidance_scale": scale, "guidance_interval": list(interval),
                       "n": len(df), "validation_agreement": validation_agreement(judge, imgs, labels),
                       "frechet_to_target": frechet_to_target(judge, imgs, target_f)}
                if reference is not None:
                    _, pred = predict(reference, imgs, batch_size=128, device=device(cfg))
                    row["reference_class_accuracy"] = float((pred == labels).float().mean())
                rows.append(row)
    table = pd.DataFrame(rows)
    best = table["validation_agreement"].max()
    near = table[table["validation_agreement"] >= best - AGREEMENT_MARGIN].copy()
    near["pref"] = near["adaptation"].map(lambda a: 0 if a == "none" else 1)
    near["interval_pref"] = near["guidance_interval"].map(lambda iv: 0 if list(iv) == list(s.guidance_interval) else 1)
    near["interval_order"] = near["guidance_interval"].map(lambda iv: intervals.index(list(iv)))
    near["frechet_rounded"] = near["frechet_to_target"].round(3)
    pick = near.sort_values(["frechet_rounded", "guidance_scale", "pref", "interval_pref", "interval_order"]).iloc[0]
    return {"adaptation": pick["adaptation"], "guidance_scale": float(pick["guidance_scale"]),
            "guidance_interval": [int(t) for t in pick["guidance_interval"]],
            "validation_agreement": float(pick["validation_agreement"]),
            "frechet_to_target": float(pick["frechet_to_target"]),
            "rule": f"lowest Frechet distance to the unlabeled target images among settings within "
                    f"{AGREEMENT_MARGIN} of the best validation agreement"}, table


def compare_samplers(cfg: Config, fraction: float, draw: int, judge: SelectiveFilter, reference,
                     guidance_scale: float, adaptation: str,
                     samplers=(("ddim", 25), ("dpm_solver", 10)), guidance_interval=None) -> pd.DataFrame:
    """The chosen guidance (scale, adaptation, interval) run by each (method, steps) sampler on one
    request (sampling.sweep_per_class per class, the same seeds for every sampler): validation
    agreement, the reference classifier's class accuracy, the Frechet distance to the
    validation images in the baseline classifier's feature space, and seconds per image.
    The samples are not kept."""
    s = cfg.sampling
    K = len(cfg.data.classes)
    labels = torch.arange(K).repeat_interleave(s.sweep_per_class)
    seeds = torch.as_tensor(request_seeds(cfg, f"sampler_comparison_f{fraction:g}_s{draw}", len(labels)))
    val = extract_features(judge.model, validation_set(cfg, fraction, draw)[0], batch_size=128, device=judge.device)
    rows = []
    for method, steps in samplers:
        gen = Generation(cfg, adaptation, guidance_scale, sampler=(method, steps), guidance_interval=guidance_interval)
        t = time.time()
        imgs = gen.decode(gen.latents("histodiffusion", fraction, labels, seeds, draw=draw, progress=False))
        took = time.time() - t
        _, pred = predict(reference, imgs, batch_size=128, device=device(cfg))
        feats = extract_features(judge.model, imgs, batch_size=128, device=judge.device)
        rows.append({"method": method, "steps": steps, "n": len(labels),
                     "guidance_scale": gen.sampling.guidance_scale,
                     "guidance_interval": list(gen.sampling.guidance_interval), "adaptation": gen.adaptation,
                     "validation_agreement": validation_agreement(judge, imgs, labels),
                     "reference_class_accuracy": float((pred == labels).float().mean()),
                     "frechet_to_validation": frechet_distance(val.double().numpy(), feats.double().numpy()),
                     "seconds_per_image": took / len(labels)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------

def _decide_guidance(cfg: Config, f0: float, d0: int, reference, train_model) -> tuple[dict, pd.DataFrame]:
    """Stage 04's decision (guidance scale, interval, adaptation, sampler), chosen on the labeled validation
    images at the primary cell's first draw or taken from the params, recorded once in decisions/guidance.json.
    Trains the adapted denoisers the chosen adaptation needs. Returns (the decision, the sweep table)."""
    choice, sweep = None, pd.DataFrame()
    if cfg.sampling.select_on_validation:
        choice, sweep = choose_guidance(cfg, f0, d0, SelectiveFilter(cfg, f0, d0), reference)
        atomic_write_csv(sweep, StudyPaths(cfg).table("guidance_selection"))
    decision = {"guidance_scale": choice["guidance_scale"] if choice else cfg.sampling.guidance_scale,
                "guidance_interval": choice["guidance_interval"] if choice else list(cfg.sampling.guidance_interval),
                "adaptation": choice["adaptation"] if choice else cfg.diffusion.grid_adaptation,
                "sampler": {"method": cfg.sampling.method, "num_inference_steps": cfg.sampling.num_inference_steps},
                "chosen_on": "validation" if choice else "params", "selection": choice}
    if decision["adaptation"] == "labeled" and train_model is not None:
        for f in grid_fractions(cfg):
            for draw in draws_for(cfg, f, f0):
                train_model("denoiser_adapted", f, "labeled", draw)
    record(cfg, "guidance", decision)
    return decision, sweep


def _fill_sets(cfg: Config, gen: Generation, primary: float) -> tuple[pd.DataFrame, dict]:
    """Every (generator, fraction, draw) set filled to its quota of kept images, and the unguided pre-trained
    model's set for the quality comparison. Returns (the accounting table, {set name: manifest})."""
    acct, frames = [], {}
    f_min = smallest_fraction(cfg)  # where the ablation generators' sets are (stage 06 compares there)
    for f in grid_fractions(cfg):
        for draw in draws_for(cfg, f, primary):
            judge = SelectiveFilter(cfg, f, draw)
            quota = quota_per_class(cfg, f, draw)
            for g in generators_needed(cfg):
                if g in ("scratch", "classifier_free") and f != f_min:
                    continue  # ablation generators at the smallest fraction only (CPU budget; see README)
                name = synthetic_set_name(g, f, draw)
                df = synthesize(gen, g, f, draw, quota, judge=judge)
                frames[name] = df
                acct.append(accounting(cfg, df, quota, name).assign(generator=g, fraction=f, draw=draw))
    # the unguided pre-trained model, for the quality comparison only (its class label is the request's)
    d0 = first_draw(cfg)
    synthesize(gen, "pretrained", f_min, d0, int(quota_per_class(cfg, f_min, d0).max()))
    accounting_table = pd.concat(acct, ignore_index=True)
    atomic_write_csv(accounting_table, StudyPaths(cfg).table("synthesis_accounting"))
    return accounting_table, frames


def _faithfulness_metrics(cfg: Config, gen: Generation, frames: dict, reference, f0: float) -> dict:
    """Guided class accuracy by the reference classifier at the primary cell: on the kept images (what the
    downstream classifier sees) and, under its own name, on every candidate the sampler made."""
    paths = StudyPaths(cfg)
    primary_sets = [(d, frames[synthetic_set_name("histodiffusion", f0, d)]) for d in draws_for(cfg, f0, f0)
                    if synthetic_set_name("histodiffusion", f0, d) in frames]
    judged = class_faithfulness(cfg, primary_sets, reference, gen)
    kept, candidates = judged["kept"], judged["candidates"]
    atomic_write_csv(pd.DataFrame(kept["per_class"]), paths.table("guided_class_faithfulness"))
    atomic_write_csv(pd.DataFrame(candidates["per_class"]), paths.table("guided_class_faithfulness_candidates"))
    return {"guided_class_accuracy": kept["accuracy"], "guided_class_accuracy_n": kept["n"],
            "guided_class_accuracy_on": "kept",
            "guided_class_accuracy_per_class": {r["class"]: r["reference_accuracy"] for r in kept["per_class"]},
            "guided_class_accuracy_classes_without_kept_images": kept["classes_without_images"],
            "guided_class_accuracy_at": {"fraction": f0, "draws": len(primary_sets)},
            "guided_class_faithfulness": kept["per_class"],
            "guided_class_accuracy_candidates": candidates["accuracy"],
            "guided_class_accuracy_candidates_n": candidates["n"],
            "guided_class_faithfulness_candidates": candidates["per_class"]}


def synthesis_stage(cfg: Config, train_model=None) -> dict:
    """Choose guidance on validation, then fill every (generator, fraction, draw) set.
    `train_model(task, fraction, adaptation, draw)` trains a model the choice needs that
    stage 02 did not (adapted denoisers of other fractions and draws).
    Returns the metrics for metrics/04_synthesis.json."""
    f0, d0 = primary_fraction(cfg), first_draw(cfg)  # the primary cell (stage 03), first label draw
    reference = reference_classifier(cfg)
    decision, sweep = _decide_guidance(cfg, f0, d0, reference, train_model)
    scale, interval, adaptation = decision["guidance_scale"], decision["guidance_interval"], decision["adaptation"]
    comparison = pd.DataFrame()
    if cfg.sampling.sampler_comparison:  # e.g. DPM-Solver++ in few steps vs DDIM, the same guidance
        comparison = compare_samplers(cfg, f0, d0, SelectiveFilter(cfg, f0, d0), reference, scale, adaptation,
                                      samplers=parse_samplers(cfg.sampling.sampler_comparison, "sampling.sampler_comparison"),
                                      guidance_interval=interval)
        atomic_write_csv(comparison, StudyPaths(cfg).table("sampler_comparison"))
    gen = Generation(cfg, adaptation, scale, guidance_interval=interval)
    accounting_table, frames = _fill_sets(cfg, gen, f0)
    return {"guidance_scale": scale, "guidance_interval": interval, "adaptation": adaptation,
            "selection": decision["selection"], "selection_table": sweep.to_dict(orient="records"),
            **_faithfulness_metrics(cfg, gen, frames, reference, f0),
            "accounting": accounting_table.to_dict(orient="records"),
            "near_copy_rate": near_copy_rates(accounting_table),
            "near_copy_rate_at_primary": near_copy_rates(accounting_table[accounting_table["fraction"] == f0]),
            "delta_percentile": cfg.filtering.delta_percentile,
            "sampler_comparison": comparison.to_dict(orient="records")}


def near_copy_rates(accounting_rows: pd.DataFrame) -> dict:
    """Per generator: near copies among its candidates, pooled over the given rows."""
    return {g: float(rows["near_copies"].sum() / max(1, rows["candidates"].sum()))
            for g, rows in accounting_rows.groupby("generator", sort=False)}

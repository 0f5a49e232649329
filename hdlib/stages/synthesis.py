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

import time

import pandas as pd
import torch

from ..config import Config, parse_samplers
from ..downstream import extract_features, predict
from ..io import atomic_write_csv, atomic_write_json
from ..metrics import feature_stats, frechet_distance
from ..models import encode_images
from ..paths import StudyPaths, request_seeds, synthetic_set_name
from ..study.classifiers import SelectiveFilter, reference_classifier
from ..study.context import device
from ..study.generation import Generation
from ..study.latent_models import load_latent_classifier
from ..study.splits import grid_fractions, split_images, split_labels
from ..study.synthetic_sets import (
    _in_memory,
    accounting,
    generators_needed,
    quota_per_class,
    synthesize,
)

# ---------------------------------------------------------------------------
# image classifiers: the independent reference judge and the real-only baseline
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# synthetic sets: quota filling, on disk, resumable
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# choosing the guidance scale and the adaptation on the validation split
# ---------------------------------------------------------------------------

def validation_agreement(judge: SelectiveFilter, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose nearest validation-class centroid (baseline features) is their
    target class: class faithfulness judged by the validation split only."""

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
                     guidance_scale: float, adaptation: str,
                     samplers=(("ddim", 25), ("dpm_solver", 10))) -> pd.DataFrame:
    """The chosen guidance (scale, adaptation) run by each (method, steps) sampler on one
    request (sampling.sweep_per_class per class, the same seeds for every sampler): validation
    agreement, the reference classifier's class accuracy, the Frechet distance to the
    validation images in the baseline classifier's feature space, and seconds per image.
    The samples are not kept."""
    s = cfg.sampling
    K = len(cfg.data.classes)
    labels = torch.arange(K).repeat_interleave(s.sweep_per_class)
    seeds = torch.as_tensor(request_seeds(cfg, f"sampler_comparison_f{fraction:g}_s{draw}", len(labels)))
    val = extract_features(judge.model, split_images(cfg, "target_val"), batch_size=128, device=judge.device)
    rows = []
    for method, steps in samplers:
        gen = Generation(cfg, adaptation, guidance_scale, sampler=(method, steps))
        t = time.time()
        imgs = gen.decode(gen.latents("histodiffusion", fraction, labels, seeds, draw=draw, progress=False))
        took = time.time() - t
        _, pred = predict(reference, imgs, batch_size=128, device=device(cfg))
        feats = extract_features(judge.model, imgs, batch_size=128, device=judge.device)
        rows.append({"method": method, "steps": steps, "n": len(labels),
                     "guidance_scale": gen.sampling.guidance_scale, "adaptation": gen.adaptation,
                     "validation_agreement": validation_agreement(judge, imgs, labels),
                     "reference_class_accuracy": float((pred == labels).float().mean()),
                     "frechet_to_validation": frechet_distance(*feature_stats(feats.double().numpy()),
                                                               *feature_stats(val.double().numpy())),
                     "seconds_per_image": took / len(labels)})
    return pd.DataFrame(rows)


@torch.no_grad()
def guided_faithfulness(cfg: Config, images: torch.Tensor, labels: torch.Tensor, reference_pred: torch.Tensor,
                        latent_classifier, gen: "Generation") -> list[dict]:
    """Per target class: the share of guided samples the reference classifier gives their target
    class, its most frequent other call, and the share the latent classifier that guided them
    gives their target class (on the re-encoded image, at t = 0). Where the latent classifier
    agrees and the reference does not, guidance satisfied the latent classifier without
    producing the class's appearance: the break is the latent classifier, not the sampler."""

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


# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------

def synthesis_stage(cfg: Config, train_model=None) -> dict:
    """Choose guidance on validation, then fill every (generator, fraction, draw) set.
    `train_model(task, fraction, adaptation, draw)` trains a model the choice needs that
    stage 02 did not (adapted denoisers of other fractions and draws).
    Returns the metrics for metrics/04_synthesis.json."""

    paths = StudyPaths(cfg)
    draws, fractions = list(cfg.downstream.seeds), grid_fractions(cfg)
    f0, d0 = min(cfg.downstream.fractions), draws[0]
    reference = reference_classifier(cfg)
    choice, sweep = None, pd.DataFrame()
    if cfg.sampling.select_on_validation:
        choice, sweep = choose_guidance(cfg, f0, d0, SelectiveFilter(cfg, f0, d0), reference)
        atomic_write_csv(sweep, paths.table("guidance_selection"))
    scale = choice["guidance_scale"] if choice else cfg.sampling.guidance_scale
    adaptation = choice["adaptation"] if choice else cfg.diffusion.grid_adaptation
    if adaptation == "labeled" and train_model is not None:
        for draw in draws:
            for f in fractions:
                train_model("denoiser_adapted", f, "labeled", draw)
    atomic_write_json(paths.metrics_dir / "04_choice.json",
                      {"guidance_scale": scale, "adaptation": adaptation,
                       "chosen_on": "validation" if choice else "params", "selection": choice})
    comparison = pd.DataFrame()
    if cfg.sampling.sampler_comparison:  # e.g. DPM-Solver++ in few steps vs DDIM, the same guidance
        comparison = compare_samplers(cfg, f0, d0, SelectiveFilter(cfg, f0, d0), reference, scale, adaptation,
                                      samplers=parse_samplers(cfg.sampling.sampler_comparison, "sampling.sampler_comparison"))
        atomic_write_csv(comparison, paths.table("sampler_comparison"))
    gen = Generation(cfg, adaptation, scale)
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

    faithfulness = guided_faithfulness(cfg, imgs, labels, pred, load_latent_classifier(cfg, f0, d0), gen)
    atomic_write_csv(pd.DataFrame(faithfulness), paths.table("guided_class_faithfulness"))
    near = {g: float(accounting_table[accounting_table["generator"] == g]["near_copies"].sum()
                     / max(1, accounting_table[accounting_table["generator"] == g]["candidates"].sum()))
            for g in accounting_table["generator"].unique()}
    metrics = {"guidance_scale": scale, "adaptation": adaptation,
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

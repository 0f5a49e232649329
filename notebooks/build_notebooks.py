"""Writes notebooks/NN_*.ipynb from the cell lists below (run after editing:
`python notebooks/build_notebooks.py`). The .ipynb files are what papermill
executes and what users open in JupyterLab; editing them there is fine too, but
then port the change here or stop using this script."""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

PARAMS = '''# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []'''

SETUP = '''import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

from hdlib import plots, study, train
from hdlib.io import atomic_write_csv

cfg = study.setup_notebook(params_file, overrides)
out = cfg.results_dir
print(f"study {cfg.study.name} -> {out}; device {study.device(cfg)}")'''


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text, tags=None):
    cell = nbf.v4.new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = tags
    return cell


def notebook(title, intro, cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [md(f"# {title}\n\n{intro}"), code(PARAMS, tags=["parameters"]), code(SETUP)] + cells
    return nb


NOTEBOOKS = {}

NOTEBOOKS["00_data"] = notebook(
    "00 - Data",
    "Builds (or scans) the study's data: the labeled target (train / validation / test), "
    "nested label-fraction subsets, and the unlabeled pre-training pool, which never contains the target "
    "(checked by file hash). Writes manifests with hashes to `manifests/` so the study can be re-run on "
    "exactly the same images.",
    [
        code("summary = study.prepare_data(cfg)"),
        md("## Labeled target: images per class and split\n"
           "Validation is held out from the training set (stratified, seeded); the test set is used once, "
           "for the final evaluation only."),
        code('''counts = pd.DataFrame(summary["counts"])
counts.loc["total"] = counts.sum()
atomic_write_csv(counts.reset_index(names="class"), study.tables_dir(cfg) / "data_counts.csv")
counts'''),
        md("## Label-fraction subsets (nested: each smaller subset is inside the larger ones)"),
        code('''fractions = pd.DataFrame(summary["fractions"])
fractions.columns = [f"{float(c):.0%}" for c in fractions.columns]
fractions.loc["total"] = fractions.sum()
atomic_write_csv(fractions.reset_index(names="class"), study.tables_dir(cfg) / "data_fractions.csv")
fractions'''),
        md("## Unlabeled pre-training pool per source"),
        code('''pool_table = pd.DataFrame({"tiles in pool": summary["pool"], "available": summary["pool_available"],
                           "held out (autoencoder eval)": summary["pool_holdout"]})
pool_table'''),
        md("## Sample grid per class (target training set)"),
        code('''target = study.load_target(cfg)
fig = plots.per_class_rows(target["train_images"], target["train_labels"], cfg.data.classes, n=10,
                           title="Labeled target: training images per class")
plots.save(fig, cfg, "data_target_per_class")'''),
        md("## Sample grid per unlabeled source"),
        code('''pool = study.load_pool(cfg)
rows = {name: pool["images"][pool["source_ids"] == i][:10] for i, name in enumerate(pool["sources"])}
fig = plots.image_rows(rows, n=10, title="Unlabeled pre-training pool: tiles per source")
plots.save(fig, cfg, "data_pool_per_source")'''),
        md("## Labeled images per class at each label fraction"),
        code('''frac_long = (pd.DataFrame(summary["fractions"]).reset_index(names="class")
             .melt(id_vars="class", var_name="fraction", value_name="images"))
frac_long["fraction"] = frac_long["fraction"].astype(float).map(lambda f: f"{f:.0%}")
fig = plots.bar(frac_long, x="class", y="images", hue="fraction", title="Labeled training images per class")
fig.axes[0].set_yscale("log")
plots.save(fig, cfg, "data_fractions")'''),
    ],
)

NOTEBOOKS["01_autoencoder"] = notebook(
    "01 - Autoencoder",
    "Trains the KL-regularised autoencoder (`diffusers.AutoencoderKL`) on the unlabeled pool only, with "
    "L1 + (1 - SSIM) + a small KL term. The paper used LPIPS and a patch discriminator; LPIPS weights cannot be "
    "downloaded here, so SSIM is the structural term. The latent scale factor is 1/std of the pool latents.",
    [
        code('train.launch_task(cfg, params_file, overrides, "autoencoder")'),
        code("metrics = study.autoencoder_stage(cfg)\n"
             "{k: v for k, v in metrics.items() if k != 'reconstruction'}"),
        md("## Reconstruction quality on held-out tiles (never trained on)"),
        code('pd.DataFrame(metrics["reconstruction"]).round(3)'),
        code('''fig = plots.loss_curves({"autoencoder": study.training_log(cfg, "autoencoder")}, title="Autoencoder training loss")
plots.save(fig, cfg, "autoencoder_loss")'''),
        md("## Reconstructions: originals and reconstructions per source and for the target"),
        code('''fig = plots.image_rows(study.reconstruction_examples(cfg, n=8), n=8,
                       title="Held-out tiles and their reconstructions")
plots.save(fig, cfg, "autoencoder_reconstructions")'''),
        md("## Latent statistics (scaled latents should be roughly unit variance)"),
        code('''import matplotlib.pyplot as plt
lat = study.load_latents(cfg)["pool"]
fig, ax = plt.subplots(figsize=(7, 3.4))
for c in range(lat.shape[1]):
    ax.hist(lat[:, c].flatten().numpy(), bins=80, histtype="step", density=True, label=f"channel {c}")
ax.set_title("Scaled pool latents per channel"); ax.set_xlabel("value"); ax.legend(fontsize=8)
plots.save(fig, cfg, "autoencoder_latent_hist")'''),
    ],
)

NOTEBOOKS["02_diffusion"] = notebook(
    "02 - Unconditional latent diffusion",
    "Pre-trains the unconditional latent denoiser (`diffusers.UNet2DModel`, epsilon prediction, the paper's "
    "schedule, L1 loss, EMA) on the unlabeled pool, never the target. Then adapts it to the target as "
    "`diffusion.adaptations` asks (`none`: frozen; `labeled`: fine-tuned on the labeled fraction; "
    "`target_unlabeled`: fine-tuned on all target training images without labels), and trains the ablation "
    "model from scratch on the labeled fraction only.",
    [
        code('''fractions = cfg.downstream.fractions
train.launch_task(cfg, params_file, overrides, "denoiser_pretrain")
for adaptation in cfg.diffusion.adaptations:
    if adaptation == "labeled":
        for f in fractions:
            train.launch_task(cfg, params_file, overrides, "denoiser_adapt", fraction=f, adaptation="labeled")
    elif adaptation == "target_unlabeled":
        train.launch_task(cfg, params_file, overrides, "denoiser_adapt", adaptation="target_unlabeled")
for f in fractions:
    train.launch_task(cfg, params_file, overrides, "denoiser_scratch", fraction=f)'''),
        md("## Loss curves"),
        code('''f0 = min(fractions)
names = {"pre-trained (pool)": "ldm_pretrained", f"from scratch ({f0:.0%} labels)": train.model_name("denoiser_scratch", f0)}
if "labeled" in cfg.diffusion.adaptations:
    names[f"adapted, labeled ({f0:.0%})"] = train.model_name("denoiser_adapt", f0, "labeled")
fig = plots.loss_curves({k: study.training_log(cfg, v) for k, v in names.items()}, title="Latent denoiser training loss")
plots.save(fig, cfg, "diffusion_loss")'''),
        md("## Unconditional samples (no guidance)"),
        code('''n = 10
samples, sample_latents = {}, {}
for label, name in names.items():
    z = study.generate_latents(cfg, name, f0, np.zeros(n, dtype=int), study.request_seeds(cfg, "uncond", n),
                               guidance_scale=0.0)
    sample_latents[label] = z
    samples[label] = study.decode(cfg, z)
target = study.load_target(cfg)
samples["real target"] = target["train_images"][torch.randperm(len(target["train_images"]), generator=torch.Generator().manual_seed(0))[:n]]
fig = plots.image_rows(samples, n=n, title="Unconditional samples (same seeds per row)")
plots.save(fig, cfg, "diffusion_samples")'''),
        md("## Quick per-source realism check\n"
           "Frechet distance between simple latent statistics (per-channel mean, std and gradient energy) of "
           "64 samples and of each real source. Lower is closer: it shows which data each model imitates. "
           "A coarse check, not FID (that comes in 06_quality)."),
        code('''n_check = 64
check = {label: study.generate_latents(cfg, name, f0, np.zeros(n_check, dtype=int),
                                       study.request_seeds(cfg, "realism", n_check), guidance_scale=0.0, progress=False)
         for label, name in names.items()}
realism = study.per_source_realism(cfg, check).pivot(index="model", columns="source", values="frechet").round(3)
atomic_write_csv(realism.reset_index(), study.tables_dir(cfg) / "diffusion_realism.csv")
study.write_metrics(cfg, "02_diffusion", {"realism_frechet": realism.to_dict()})
realism'''),
    ],
)

NOTEBOOKS["03_guidance"] = notebook(
    "03 - Noise-aware latent classifier and the CFG baseline",
    "Trains, per label fraction, the latent classifier used for guidance on noised latents z_t at random t, "
    "conditioned on t (the authors' release trained it on clean latents only and queried it at every t). "
    "Also trains the class-conditional denoiser for the classifier-free-guidance baseline.",
    [
        code('''fractions = cfg.downstream.fractions
for f in fractions:
    train.launch_task(cfg, params_file, overrides, "latent_classifier", fraction=f)
    train.launch_task(cfg, params_file, overrides, "denoiser_cfg", fraction=f)'''),
        md("## Validation accuracy of the latent classifier by noise level t"),
        code('''from hdlib.latent_classifier import accuracy_by_timestep_bucket
lat = study.load_latents(cfg)
tables = []
for f in fractions:
    acc = accuracy_by_timestep_bucket(study.load_latent_classifier(cfg, f), lat["val"], lat["val_labels"],
                                      study.noise_scheduler(cfg), buckets=10, seed=cfg.study.seed)
    acc["fraction"] = f
    tables.append(acc)
acc = pd.concat(tables)
atomic_write_csv(acc, study.tables_dir(cfg) / "latent_classifier_accuracy_by_t.csv")
study.write_metrics(cfg, "03_guidance", {"accuracy_by_t": acc.to_dict(orient="records")})
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(7, 3.8))
for f, g in acc.groupby("fraction"):
    ax.plot((g["bucket_start"] + g["bucket_end"]) / 2, g["accuracy"], marker="o", label=f"{f:.0%} labels")
ax.axhline(1 / len(cfg.data.classes), color="grey", ls="--", label="chance")
ax.set_xlabel("diffusion timestep t"); ax.set_ylabel("validation accuracy")
ax.set_title("Noise-aware latent classifier: accuracy on z_t by t"); ax.legend(fontsize=8)
plots.save(fig, cfg, "latent_classifier_accuracy_by_t")'''),
        code('''fig = plots.loss_curves({f"classifier {f:.0%}": study.training_log(cfg, train.model_name("latent_classifier", f)) for f in fractions}
                       | {f"CFG denoiser {f:.0%}": study.training_log(cfg, train.model_name("denoiser_cfg", f)) for f in fractions},
                       title="Latent classifier and CFG denoiser training loss")
plots.save(fig, cfg, "guidance_loss")'''),
    ],
)

NOTEBOOKS["04_synthesis"] = notebook(
    "04 - Class-specific synthesis and selective filtering",
    "For each label fraction in the grid: generates candidates with classifier-guided DDIM from the pre-trained "
    "denoiser (HistoDiffusion), the from-scratch denoiser (same guidance) and the CFG baseline; then filters "
    "them with the real-only baseline classifier (nearest class centroid = target class, confidence >= tau, "
    "near-copy check), ranked by distance to the centroid.",
    [
        code('''from hdlib.downstream import evaluate, extract_features, predict
ref = study.reference_classifier(cfg)
target = study.load_target(cfg)
ref_val = evaluate(ref, target["val_images"], target["val_labels"], num_classes=len(cfg.data.classes),
                   class_names=list(cfg.data.classes))
print(f"reference classifier (all training labels), validation accuracy {ref_val['accuracy']:.3f}")'''),
        code('''fractions = cfg.downstream.fractions
gens = study.synthetic_sets_needed(cfg)
summaries, blobs = [], {}
for f in fractions:
    per_class = study.candidates_per_class(cfg, f)
    for gen in gens:
        name = f"{gen}_f{f:g}"
        blobs[name] = study.synthesize(cfg, gen, f, per_class)
        _, summary, _ = study.filter_candidates(cfg, f, blobs[name], name)
        summaries.append(summary.assign(fraction=f, generator=gen))
f0 = min(fractions)
blobs[f"unguided_f{f0:g}"] = study.synthesize(cfg, "unguided", f0, cfg.quality.samples_per_class)
acceptance = pd.concat(summaries)
atomic_write_csv(acceptance, study.tables_dir(cfg) / "filtering_acceptance.csv")
acceptance.groupby(["generator", "fraction"])[["candidates", "kept"]].sum()'''),
        md("## Real vs guided vs CFG vs unguided samples per class (smallest label fraction)"),
        code('''def pick(name):
    b = blobs[name]
    return b["images"], b["labels"]
sets = {"real": (target["train_images"], target["train_labels"])}
for label, name in [("HistoDiffusion (guided)", f"guided_f{f0:g}"), ("from scratch", f"scratch_f{f0:g}"),
                    ("CFG", f"cfg_f{f0:g}"), ("unguided", f"unguided_f{f0:g}")]:
    if name in blobs:
        sets[label] = pick(name)
fig = plots.comparison_grid(sets, cfg.data.classes, n=3, title=f"Samples per class, {f0:.0%} labels")
plots.save(fig, cfg, "synthesis_comparison_grid")'''),
        md("## Guidance scale sweep\nClass accuracy of guided samples as judged by the independent reference "
           "classifier (trained on all training labels), against the guidance scale s."),
        code('''sweep = []
for s in cfg.sampling.guidance_sweep:
    b = study.synthesize(cfg, "guided", f0, cfg.sampling.sweep_per_class, guidance_scale=s, tag=f"sweep_s{s:g}_f{f0:g}")
    probs, preds = predict(ref, b["images"], batch_size=128, device=study.device(cfg))
    sweep.append({"guidance_scale": s, "class_accuracy": float((preds == b["labels"]).float().mean()),
                  "mean_target_prob": float(probs[torch.arange(len(probs)), b["labels"]].mean())})
sweep = pd.DataFrame(sweep)
atomic_write_csv(sweep, study.tables_dir(cfg) / "guidance_sweep.csv")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(6, 3.6))
ax.plot(sweep["guidance_scale"], sweep["class_accuracy"], marker="o", label="class accuracy (reference classifier)")
ax.plot(sweep["guidance_scale"], sweep["mean_target_prob"], marker="s", label="mean p(target class)")
ax.set_xscale("symlog", linthresh=1); ax.set_xlabel("guidance scale s"); ax.set_ylim(0, 1)
ax.axhline(1 / len(cfg.data.classes), color="grey", ls="--", label="chance"); ax.legend(fontsize=8)
ax.set_title(f"Guidance scale sweep ({f0:.0%} labels)")
plots.save(fig, cfg, "guidance_sweep")
sweep'''),
        md("## Filtering acceptance per class (guided candidates, smallest fraction)"),
        code('''acc0 = acceptance[(acceptance["fraction"] == f0) & (acceptance["generator"] == "guided")].copy()
acc0["class"] = [cfg.data.classes[int(k)] for k in acc0["class_id"]]
outcomes = ["kept", "wrong_centroid", "low_confidence", "near_copy", "over_quota"]
long = acc0.melt(id_vars="class", value_vars=[c for c in outcomes if c in acc0], var_name="outcome",
                 value_name="images")
fig = plots.bar(long, x="class", y="images", hue="outcome", title=f"Filtering outcome per class ({f0:.0%} labels, guided)")
plots.save(fig, cfg, "filtering_acceptance")'''),
        md("## t-SNE of real, kept and rejected synthetic features (baseline classifier space)"),
        code('''from sklearn.manifold import TSNE
name = f"guided_f{f0:g}"
filt, _, (real_f, syn_f) = study.filter_candidates(cfg, f0, blobs[name], name)
ref_f = extract_features(study.baseline_classifier(cfg, f0), target["val_images"], batch_size=128, device=study.device(cfg))
feats = np.concatenate([ref_f.numpy(), syn_f.numpy()])
groups = ["real (val)"] * len(ref_f) + ["synthetic kept" if k else "synthetic rejected" for k in filt["keep"]]
emb = TSNE(n_components=2, random_state=cfg.study.seed, init="pca", perplexity=min(30, len(feats) // 4)).fit_transform(feats)
fig = plots.embedding(emb, groups, title=f"t-SNE of baseline-classifier features ({f0:.0%} labels)")
plots.save(fig, cfg, "synthesis_tsne")
study.write_metrics(cfg, "04_synthesis", {"reference_val": ref_val, "guidance_sweep": sweep.to_dict(orient="records"),
                                          "acceptance": acceptance.to_dict(orient="records")})'''),
    ],
)

NOTEBOOKS["05_downstream"] = notebook(
    "05 - Downstream classification across label fractions",
    "Trains the downstream classifier (timm, from scratch, flips / 90-degree rotations / colour jitter) on "
    "each cell of the grid: label fraction x training set x synthetic-to-real ratio x seed. Model selection "
    "uses the validation split only; the test set is evaluated once per cell. A half-finished grid resumes.",
    [
        code('''from hdlib.grid import run_grid
cells = study.downstream_cells(cfg)
print(f"{len(cells)} cells, {cfg.study.workers} worker(s)")
results = run_grid(cells, "hdlib.study:run_downstream_cell", out / "grid", workers=cfg.study.workers,
                   id_keys=["fraction", "training_set", "ratio", "seed"], progress=cfg.study.progress)
atomic_write_csv(results.drop(columns=[c for c in results.columns if "confusion" in c or c == "study_dir"]),
                 study.tables_dir(cfg) / "downstream_grid_raw.csv")'''),
        code('''main = results[results["ratio"].isin([0.0, cfg.downstream.ratio])]
main = main[main["fraction"].isin(cfg.downstream.fractions)]
tables = {}
for metric in ["test.accuracy", "test.balanced_accuracy", "test.macro_f1"]:
    summary, comps = study.grid_summary(main, metric)
    tables[metric] = (summary, comps)
    atomic_write_csv(summary, study.tables_dir(cfg) / f"downstream_{metric.split('.')[1]}.csv")
    atomic_write_csv(comps, study.tables_dir(cfg) / f"downstream_{metric.split('.')[1]}_vs_real.csv")
summary, comps = tables["test.accuracy"]
summary.round(4)'''),
        md("## Test accuracy vs label fraction (mean and 95% CI over seeds)"),
        code('''fig = plots.accuracy_vs_fraction(summary, "test accuracy")
plots.save(fig, cfg, "downstream_accuracy_vs_fraction")'''),
        md("## Paired comparison against real-only (same fraction, same seed)"),
        code("comps.round(4)"),
        md("## Synthetic-to-real ratio sweep"),
        code('''sweep = results[(results["fraction"] == cfg.downstream.ratio_sweep_fraction)
                & results["training_set"].isin(list(cfg.downstream.ratio_sweep_sets) + ["real"])]
ratio_summary, ratio_comps = study.grid_summary(sweep, "test.accuracy")
atomic_write_csv(ratio_summary, study.tables_dir(cfg) / "downstream_ratio_sweep.csv")
atomic_write_csv(ratio_comps, study.tables_dir(cfg) / "downstream_ratio_sweep_vs_real.csv")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(6, 3.6))
real_row = ratio_summary[ratio_summary["training_set"] == "real"].iloc[0]
ax.axhspan(real_row["ci_low"], real_row["ci_high"], color="grey", alpha=0.2)
ax.axhline(real_row["mean"], color="grey", label="real only")
for s, g in ratio_summary[ratio_summary["training_set"] != "real"].groupby("training_set"):
    ax.errorbar(g["ratio"] * 100, g["mean"], yerr=[g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]], marker="o", capsize=3, label=s)
ax.set_xlabel("synthetic-to-real ratio (%)"); ax.set_ylabel("test accuracy"); ax.legend(fontsize=8)
ax.set_title(f"Ratio sweep at {cfg.downstream.ratio_sweep_fraction:.0%} labels")
plots.save(fig, cfg, "downstream_ratio_sweep")
ratio_summary.round(4)'''),
        md("## Confusion matrices at the smallest fraction (seed 0)"),
        code('''f0 = min(cfg.downstream.fractions)
import matplotlib.pyplot as plt
picks = [r for _, r in results.iterrows() if r["fraction"] == f0 and r["seed"] == cfg.downstream.seeds[0]
         and r["training_set"] in ("real", "histodiffusion") and r["ratio"] in (0.0, cfg.downstream.ratio)]
for r in picks:
    fig = plots.confusion(r["test.confusion_matrix"], cfg.data.classes, title=f"{r['training_set']}, {f0:.0%} labels, seed {r['seed']}")
    plots.save(fig, cfg, f"downstream_confusion_{r['training_set']}")'''),
        code('''study.write_metrics(cfg, "05_downstream", {
    "accuracy": tables["test.accuracy"][0].to_dict(orient="records"),
    "accuracy_vs_real": tables["test.accuracy"][1].to_dict(orient="records"),
    "balanced_accuracy": tables["test.balanced_accuracy"][0].to_dict(orient="records"),
    "macro_f1": tables["test.macro_f1"][0].to_dict(orient="records"),
    "ratio_sweep": ratio_summary.to_dict(orient="records"),
    "ratio_sweep_vs_real": ratio_comps.to_dict(orient="records"),
    "cells": len(results)})'''),
    ],
)

NOTEBOOKS["06_quality"] = notebook(
    "06 - Generation quality",
    "FID and KID (torchmetrics) overall and per class, and precision / recall of each synthetic set, in the "
    "feature space of the reference classifier trained once on all the target's training labels (no "
    "Inception weights are downloadable here; give `quality.inception_weights` a local file to add "
    "Inception FID). The real reference is the target test set; 'real (val)' is the floor a perfect "
    "generator would reach with that many images.",
    [
        code('''from hdlib.downstream import extract_features
ref = study.reference_classifier(cfg)
features = lambda x: extract_features(ref, x, batch_size=128, device=study.device(cfg)).numpy()
target = study.load_target(cfg)
sets = {"real (val)": (target["val_images"], target["val_labels"])} | study.quality_sets(cfg)
overall, per_class = study.quality_table(cfg, target["test_images"], target["test_labels"].numpy(), sets, features)
atomic_write_csv(overall, study.tables_dir(cfg) / "quality_overall.csv")
atomic_write_csv(per_class, study.tables_dir(cfg) / "quality_per_class.csv")
overall.round(4)'''),
        code('''fig = plots.bar(overall.dropna(subset=["fid"]), x="set", y="fid", title="FID to the real test set (reference-classifier features)")
plots.save(fig, cfg, "quality_fid")
fig = plots.bar(overall.dropna(subset=["kid_mean"]), x="set", y="kid_mean", err="kid_std", title="KID (mean and std over subsets)")
plots.save(fig, cfg, "quality_kid")'''),
        md("## KID per class"),
        code('''if len(per_class):
    fig = plots.bar(per_class, x="class", y="kid_mean", hue="set", title="KID per class")
    plots.save(fig, cfg, "quality_kid_per_class")
per_class.pivot(index="class", columns="set", values="fid").round(3) if len(per_class) else per_class'''),
        md("## Inception FID (only with a local weights file)"),
        code('''inception = None
if cfg.quality.inception_weights:
    from hdlib.metrics import inception_fid
    b = sets["HistoDiffusion (guided, filtered)"][0]
    inception = inception_fid(target["test_images"], b, cfg.quality.inception_weights)
    print("Inception FID (HistoDiffusion, filtered):", inception)
else:
    print("quality.inception_weights is empty: Inception FID skipped")
study.write_metrics(cfg, "06_quality", {"overall": overall.to_dict(orient="records"),
                                        "per_class": per_class.to_dict(orient="records"),
                                        "inception_fid": inception})'''),
    ],
)

NOTEBOOKS["07_report"] = notebook(
    "07 - Report",
    "Assembles `REPORT.md` in the study's results folder from the metrics and tables the earlier stages "
    "wrote: parameters, timings, the accuracy table and figure, FID/KID, filtering and guidance.",
    [
        code('''from hdlib.report import build_report
path = build_report(cfg)
display(Markdown(path.read_text()))'''),
    ],
)


def main():
    for name, nb in NOTEBOOKS.items():
        for i, cell in enumerate(nb.cells):  # stable ids: rebuilding changes nothing unless cells change
            cell["id"] = f"{name}-{i:02d}"
        nbf.write(nb, HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()

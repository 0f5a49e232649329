"""Writes notebooks/NN_*.ipynb from the cell lists below (run after editing:
`python notebooks/build_notebooks.py`). The .ipynb files are what papermill
executes and what users open in JupyterLab; editing them there is fine too, but
then port the change here or stop using this script.

Notebook NN calls `hdlib.stages.<stage>` (and earlier stages), `hdlib.paths`,
`hdlib.train`, `hdlib.stats` and `hdlib.plots`; it holds no plotting code and no
computation longer than a few lines. Every figure and table comes after a short
text saying what it shows, how to read it and what a good result looks like."""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

PARAMS = '''# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []'''

# Shared tail of every setup cell: load the config, say where results go (relative path only).
SETUP_TAIL = '''from hdlib.paths import REPO_ROOT, StudyPaths
from hdlib.stages.common import device, setup_notebook

cfg = setup_notebook(params_file, overrides)
paths = StudyPaths(cfg)
root = paths.root.resolve()
shown = root.relative_to(REPO_ROOT) if root.is_relative_to(REPO_ROOT) else root.name
print(f"study {cfg.study.name}: results in {shown}; device {device(cfg)}")'''


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text, tags=None):
    cell = nbf.v4.new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = tags
    return cell


def notebook(title, intro, imports, cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    setup = imports.strip() + "\n" + SETUP_TAIL
    nb.cells = [md(f"# {title}\n\n{intro}"), code(PARAMS, tags=["parameters"]), code(setup)] + cells
    return nb


NOTEBOOKS = {}

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["00_data"] = notebook(
    "00 - Data",
    "Builds (or scans) the study's data: the labeled target (train / validation / test), nested "
    "label-fraction subsets that simulate scarce annotation, and the unlabeled pre-training pool, which never "
    "contains a target image (checked by file hash). Writes manifests with file hashes to `manifests/` so the "
    "study can be re-run on exactly the same images, and image caches the later stages read. Nothing is "
    "trained here.",
    '''import pandas as pd

from hdlib import plots
from hdlib.io import atomic_write_csv
from hdlib.stages.data import load_pool, load_target, prepare_data''',
    [
        code('''summary = prepare_data(cfg)
skipped = {split: n for split, n in summary["unreadable"].items() if n}
print("unreadable images skipped:", skipped or "none")'''),
        md("## Table: labeled target, images per class and split\n\n"
           "Rows are tissue classes, columns the splits. The validation split is held out of the training "
           "images (stratified by class, seeded) and only used to select models; the test split is used once, "
           "for the final evaluation. **Good:** every class is present in every split, and validation and test "
           "have a class balance similar to training."),
        code('''counts = pd.DataFrame(summary["counts"])
counts.loc["total"] = counts.sum()
atomic_write_csv(counts.reset_index(names="class"), paths.table("data_counts"))
counts'''),
        md("## Table: label-fraction subsets\n\n"
           "The study keeps the labels of only a fraction of the training images. Columns are label fractions, "
           "cells the number of labeled images per class. Subsets are nested (every image labeled at the "
           "smallest fraction is also labeled at the larger ones) and stratified, so class proportions are "
           "preserved. **Check:** every class has at least one labeled image at the smallest fraction; with "
           "only a handful per class, results at that fraction vary a lot between seeds."),
        code('''fractions = pd.DataFrame(summary["fractions"])
fractions.columns = [f"{float(c):.0%}" for c in fractions.columns]
fractions.loc["total"] = fractions.sum()
atomic_write_csv(fractions.reset_index(names="class"), paths.table("data_fractions"))
fractions'''),
        md("## Table: unlabeled pre-training pool per source\n\n"
           "Per source: tiles drawn into the pool, tiles the source offered, and tiles held out to test the "
           "autoencoder on images it never trained on. The generative model learns histology from these "
           "tiles only, never from the labeled target."),
        code('''pool_table = pd.DataFrame({"tiles in pool": summary["pool"], "available": summary["pool_available"],
                           "held out (autoencoder test)": summary["pool_holdout"]})
atomic_write_csv(pool_table.reset_index(names="source"), paths.table("data_pool"))
pool_table'''),
        md("## Figure: labeled target images per class\n\n"
           "Each row is one tissue class (row label) with ten of its training images. **How to read:** images "
           "in a row should share the tissue pattern of their class and differ from the other rows; this is "
           "what the generator has to reproduce per class. **Look out for** mislabeled tiles, empty tiles "
           "outside the background class, or strong stain differences within a class."),
        code('''target = load_target(cfg)
fig = plots.per_class_rows(target["train_images"], target["train_labels"], cfg.data.classes, n=10,
                           title="Labeled target: training images per class")
plots.save(fig, cfg, "data_target_per_class")'''),
        md("## Figure: unlabeled pool, tiles per source\n\n"
           "Each row is one source of the unlabeled pool: the images the autoencoder and the unconditional "
           "diffusion model learn from. **Good:** tissue-rich tiles with varied morphology. Stain or scanner "
           "differences from the target are expected (the study asks whether pre-training on other data "
           "helps); tiles that are mostly glass, pen marks or out of focus mean the tissue filter "
           "(`data.tissue_threshold`) is too lax."),
        code('''pool = load_pool(cfg)
rows = {name: pool["images"][pool["source_ids"] == i][:10] for i, name in enumerate(pool["sources"])}
fig = plots.image_rows(rows, n=10, title="Unlabeled pre-training pool: tiles per source")
plots.save(fig, cfg, "data_pool_per_source")'''),
        md("## Figure: labeled images per class at each label fraction\n\n"
           "Bars give the number of labeled training images per class (log scale), one colour per label "
           "fraction. **Good:** each colour keeps the same relative bar heights across classes (stratified "
           "sampling) and no class drops to zero."),
        code('''frac_long = (pd.DataFrame(summary["fractions"]).reset_index(names="class")
             .melt(id_vars="class", var_name="fraction", value_name="images"))
frac_long["fraction"] = frac_long["fraction"].astype(float).map(lambda f: f"{f:.0%}")
fig = plots.bar(frac_long, x="class", y="images", hue="fraction", log_y=True, ylabel="labeled images (log scale)",
                title="Labeled training images per class and label fraction")
plots.save(fig, cfg, "data_fractions")'''),
    ],
)

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["01_autoencoder"] = notebook(
    "01 - Autoencoder",
    "The autoencoder compresses each H&E tile into a small latent image; the diffusion model works in this "
    "latent space. With `pretrained.path` set, a pre-trained autoencoder (diffusers format) is loaded, not "
    "trained. Otherwise the KL-regularised autoencoder (`diffusers.AutoencoderKL`) is trained here on the "
    "unlabeled pool only, with L1 + (1 - SSIM) + a small KL term (the paper used LPIPS and a patch "
    "discriminator; LPIPS weights cannot be downloaded here, so SSIM is the structural term). Latents are "
    "scaled to unit variance: the scale factor is 1/std of the pool latents, or the pre-trained model's own.",
    '''import pandas as pd
from IPython.display import Markdown, display

from hdlib import plots, train
from hdlib.stages.autoencoder import autoencoder_stage, load_latents, reconstruction_examples, training_log''',
    [
        md("## Which autoencoder this study uses"),
        code('''if cfg.pretrained.path:
    display(Markdown(f"**Pre-trained autoencoder, loaded from `{cfg.pretrained.path}`** (not trained in this "
                     "study; its latent scale factor comes with it)."))
else:
    train.launch_task(cfg, params_file, overrides, "autoencoder")
    display(Markdown("**Autoencoder trained in this study** on the unlabeled pool (settings: `autoencoder`)."))'''),
        md("## Table: latent space summary\n\n"
           "The latent shape (channels x height x width) says how much each tile is compressed; the scaled "
           "latents should have mean near 0 and std near 1. The PSNR is averaged over the held-out pool tiles."),
        code('''metrics = autoencoder_stage(cfg)
pd.Series({"latent shape (C x H x W)": " x ".join(map(str, metrics["latent_shape"])),
           "latent scale factor": round(metrics["scale_factor"], 4),
           "scaled latent mean": round(metrics["scaled_latent_mean"], 3),
           "scaled latent std": round(metrics["scaled_latent_std"], 3),
           "held-out pool PSNR (dB)": round(metrics["heldout_pool_psnr_db"], 2)}, name="value").to_frame()'''),
        md("## Table: reconstruction quality on held-out tiles\n\n"
           "One row per pool source (tiles held out of training) and one for the target's validation images "
           "(never used to train the autoencoder, possibly another stain). PSNR (dB) measures pixel fidelity "
           "and SSIM (0 to 1) structural fidelity; higher is better for both. **Good:** the target row is "
           "about as good as the pool rows, i.e. the autoencoder generalises to the target's stain; a much "
           "worse target row means generated target images will be blurred or colour-shifted however good "
           "the diffusion model is."),
        code('pd.DataFrame(metrics["reconstruction"]).round(3)'),
        md("## Figure: autoencoder training loss\n\n"
           "Only when the autoencoder was trained here. Training loss (log scale, smoothed) against the "
           "optimisation step. **Good:** a steady decrease that flattens towards the end; a curve still "
           "falling steeply means more steps (`autoencoder.train.max_steps`) would help."),
        code('''if cfg.pretrained.path:
    print("pre-trained autoencoder: no training loss to show")
else:
    fig = plots.loss_curves({"autoencoder": training_log(cfg, "autoencoder")}, title="Autoencoder training loss")
    plots.save(fig, cfg, "autoencoder_loss")'''),
        md("## Figure: originals and their reconstructions\n\n"
           "Rows come in pairs: held-out tiles of a source (or of the target), then the same tiles after "
           "encoding and decoding (`(recon)`). **How to read:** compare each tile with the one below it. "
           "**Good:** nuclei, cell borders, glands and stroma fibres are preserved and colours match; some "
           "blur of fine chromatin texture is the usual price of the compression."),
        code('''fig = plots.image_rows(reconstruction_examples(cfg, n=8), n=8, title="Held-out tiles and their reconstructions")
plots.save(fig, cfg, "autoencoder_reconstructions")'''),
        md("## Figure: distribution of the latent values\n\n"
           "Histogram of the scaled latent values of the pool, one line per latent channel (the legend gives "
           "each channel's std), with the standard normal N(0, 1) dotted. The diffusion model assumes latents "
           "of about unit scale. **Good:** every channel centred near 0 with a spread close to 1; a channel "
           "much narrower than the others carries little information."),
        code('''fig = plots.latent_histograms(load_latents(cfg)["pool"], title="Scaled pool latents per channel")
plots.save(fig, cfg, "autoencoder_latent_hist")'''),
    ],
)

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["02_diffusion"] = notebook(
    "02 - Unconditional latent diffusion",
    "The unconditional latent denoiser (`diffusers.UNet2DModel`, epsilon prediction, the paper's noise "
    "schedule, L1 loss, EMA) learns what histology looks like from the unlabeled pool, never from the target. "
    "When `pretrained.path` holds a denoiser, that model is loaded instead of trained. It is then adapted to "
    "the target as `diffusion.adaptations` asks (`none`: used as is; `labeled`: fine-tuned on the labeled "
    "fraction; `target_unlabeled`: fine-tuned on all target training images, without their labels). For the "
    "ablation, a denoiser of the same architecture is trained from scratch on the labeled fraction only.",
    '''import numpy as np
import torch
from IPython.display import Markdown, display

from hdlib import plots, train
from hdlib.io import atomic_write_csv
from hdlib.paths import model_name
from hdlib.stages.autoencoder import training_log
from hdlib.stages.common import write_metrics
from hdlib.stages.data import grid_fractions, load_target
from hdlib.stages.diffusion import per_source_realism, unconditional_samples, uses_pretrained_unet''',
    [
        md("## Which denoiser this study uses, and training"),
        code('''fractions = grid_fractions(cfg)
if uses_pretrained_unet(cfg):
    display(Markdown(f"**Pre-trained unconditional denoiser, loaded from `{cfg.pretrained.path}`** "
                     "(not trained in this study)."))
else:
    train.launch_task(cfg, params_file, overrides, "denoiser_pretrained")
    display(Markdown("**Unconditional denoiser pre-trained in this study** on the unlabeled pool "
                     "(settings: `diffusion`, `diffusion.pretrain`)."))
for adaptation in cfg.diffusion.adaptations:
    if adaptation == "labeled":
        for f in fractions:
            train.launch_task(cfg, params_file, overrides, "denoiser_adapted", fraction=f, adaptation="labeled")
    elif adaptation == "target_unlabeled":
        train.launch_task(cfg, params_file, overrides, "denoiser_adapted", adaptation="target_unlabeled")
for f in fractions:
    train.launch_task(cfg, params_file, overrides, "denoiser_scratch", fraction=f)'''),
        md("## Figure: denoiser training loss\n\n"
           "Training loss (log scale, smoothed) of each denoiser trained here, at the smallest label fraction, "
           "named as in `models/`: `denoiser_pretrained` (pool), `denoiser_adapted_*` (fine-tuned on the "
           "target), `denoiser_scratch_*` (labeled fraction only). Diffusion losses are noisy and fall slowly: "
           "compare the level reached rather than single steps. **Expect** the adapted model to start low (it "
           "starts from the pre-trained weights); a from-scratch model with very few images can reach a low "
           "loss by memorising them, which is not a sign of quality (see the samples below)."),
        code('''f0 = min(cfg.downstream.fractions)
models = ["denoiser_pretrained"]
if "labeled" in cfg.diffusion.adaptations:
    models.append(model_name("denoiser_adapted", f0, "labeled"))
if "target_unlabeled" in cfg.diffusion.adaptations:
    models.append(model_name("denoiser_adapted", adaptation="target_unlabeled"))
models.append(model_name("denoiser_scratch", f0))
trained_here = [m for m in models if not (m == "denoiser_pretrained" and uses_pretrained_unet(cfg))]
fig = plots.loss_curves({m: training_log(cfg, m) for m in trained_here}, title="Latent denoiser training loss")
plots.save(fig, cfg, "diffusion_loss")'''),
        md("## Figure: unconditional samples\n\n"
           "Each row shows ten samples of one model, from the same random seeds and without any class "
           "guidance, and the last row real target training images for comparison. **How to read:** look "
           "for realistic tissue architecture (nuclei with chromatin texture, intact cell borders, coherent "
           "glands and stroma) and for the stain style of each model's training data. **Good:** the "
           "pre-trained model gives varied, realistic histology in the pool's stain; adapted models move "
           "towards the target's look; a from-scratch model trained on few images tends to give blurry tiles "
           "or near-copies of its training images."),
        code('''n = 10
samples = {m: images for m, (_, images) in unconditional_samples(cfg, models, n, "uncond").items()}
target = load_target(cfg)
pick = torch.randperm(len(target["train_images"]), generator=torch.Generator().manual_seed(cfg.study.seed))[:n]
samples["real target"] = target["train_images"][pick]
fig = plots.image_rows(samples, n=n, title="Unconditional samples (same seeds in every row)")
plots.save(fig, cfg, "diffusion_samples")'''),
        md("## Table: which data each model imitates\n\n"
           "Frechet distance between simple latent statistics (per-channel mean, std and gradient energy) of "
           "64 samples of each model (rows) and of each real source (columns: the pool sources and the "
           "target). Lower is closer. **How to read:** in each row, the smallest value names the data the "
           "model's samples resemble most; adapted models should be closer to `target` than the pre-trained "
           "one. A coarse check, not an image-quality metric (FID and KID follow in 06_quality)."),
        code('''n_check = 64
check = {m: z for m, (z, _) in unconditional_samples(cfg, models, n_check, "realism").items()}
realism = per_source_realism(cfg, check).pivot(index="model", columns="source", values="frechet").round(3)
atomic_write_csv(realism.reset_index(), paths.table("diffusion_realism"))
write_metrics(cfg, "02_diffusion", {"realism_frechet": realism.to_dict(),
                                    "pretrained_denoiser": uses_pretrained_unet(cfg)})
realism'''),
    ],
)

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["03_guidance"] = notebook(
    "03 - Noise-aware latent classifier and the classifier-free baseline",
    "Guidance steers the unconditional model towards a tissue class. For each label fraction, a latent "
    "classifier learns to recognise the class from *noised* latents z_t at random noise levels t, "
    "conditioned on t (noise-aware; the authors' release trained it on clean latents only and queried it at "
    "every t). During sampling its gradient pushes each denoising step towards the requested class. For the "
    "classifier-free-guidance baseline (`classifier_free`), a class-conditional denoiser is trained on the "
    "labeled fraction, with the label dropped at random (`diffusion.classifier_free_label_dropout`).",
    '''from hdlib import plots, train
from hdlib.io import atomic_write_csv
from hdlib.paths import model_name
from hdlib.stages.autoencoder import training_log
from hdlib.stages.common import write_metrics
from hdlib.stages.data import grid_fractions
from hdlib.stages.guidance import accuracy_by_t''',
    [
        code('''fractions = grid_fractions(cfg)
for f in fractions:
    train.launch_task(cfg, params_file, overrides, "latent_classifier", fraction=f)
    train.launch_task(cfg, params_file, overrides, "denoiser_classifier_free", fraction=f)'''),
        md("## Figure: latent-classifier accuracy by noise level\n\n"
           "Validation accuracy of each fraction's latent classifier (one line per label fraction) on "
           "validation latents noised to timestep t (x axis: 0 = clean, right = almost pure noise); dashed: "
           "chance (1 / number of classes). **How to read:** guidance can only steer where the classifier is "
           "better than chance. **Good:** high accuracy at small t, falling smoothly towards chance at large "
           "t, and higher lines for larger label fractions. A line at chance everywhere means guidance will "
           "not produce the requested classes."),
        code('''acc = accuracy_by_t(cfg, fractions)
atomic_write_csv(acc, paths.table("latent_classifier_accuracy_by_t"))
write_metrics(cfg, "03_guidance", {"accuracy_by_t": acc.to_dict(orient="records")})
fig = plots.latent_classifier_accuracy(acc, num_classes=len(cfg.data.classes))
plots.save(fig, cfg, "latent_classifier_accuracy_by_t")'''),
        md("## Figure: training loss of the latent classifiers and classifier-free denoisers\n\n"
           "Cross-entropy of the latent classifiers and denoising loss of the class-conditional "
           "(classifier-free) denoisers, log scale, one line per model (named as in `models/`). **Good:** "
           "decreasing curves. With few labels, a classifier loss that falls to almost zero means the "
           "classifier has memorised its few training latents; the validation accuracy above shows whether it "
           "still generalises."),
        code('''logs = {model_name("latent_classifier", f): training_log(cfg, model_name("latent_classifier", f)) for f in fractions}
logs |= {model_name("denoiser_classifier_free", f): training_log(cfg, model_name("denoiser_classifier_free", f))
         for f in fractions}
fig = plots.loss_curves(logs, title="Latent classifier and classifier-free denoiser training loss")
plots.save(fig, cfg, "guidance_loss")'''),
    ],
)

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["04_synthesis"] = notebook(
    "04 - Class-specific synthesis and selective filtering",
    "For each label fraction of the grid, generates candidate images per class with every generator the "
    "downstream grid needs, then filters them with the real-only baseline classifier trained on that "
    "fraction: a candidate is kept if its nearest class centroid (in the classifier's feature space) is the "
    "intended class, the classifier's confidence in that class is at least `filtering.tau`, and it is not a "
    "near-copy of a real training image; kept images are ranked by distance to their class centroid.",
    '''import pandas as pd
from IPython.display import Markdown, display

from hdlib import plots
from hdlib.downstream import evaluate
from hdlib.io import atomic_write_csv
from hdlib.paths import GENERATORS, synthetic_set_name
from hdlib.stages.common import write_metrics
from hdlib.stages.data import grid_fractions, load_target
from hdlib.stages.synthesis import (Generation, candidates_per_class, filter_candidates, filter_embedding,
                                    generators_needed, guidance_sweep, reference_classifier, synthesize)''',
    [
        md("## The reference classifier (an independent judge)\n\n"
           "Trained once on *all* of the target's training labels. It never decides what is kept; it judges "
           "the class of generated images (guidance sweep below) and gives the feature space for FID / KID "
           "(06_quality). Its validation accuracy bounds how well it can judge: at 0.9, about one correct "
           "sample in ten is still judged wrong."),
        code('''target = load_target(cfg)
ref = reference_classifier(cfg)
ref_val = evaluate(ref, target["val_images"], target["val_labels"], num_classes=len(cfg.data.classes),
                   class_names=list(cfg.data.classes), device=device(cfg))
print(f"reference classifier (all training labels): validation accuracy {ref_val['accuracy']:.3f}")'''),
        md("## Generation and filtering"),
        code('''gen = Generation(cfg)
generators = generators_needed(cfg)
display(Markdown("Generators (the unguided `pretrained` one only at the smallest fraction, for 06_quality):\\n\\n"
                 + "\\n".join(f"- `{g}`: {GENERATORS[g]}" for g in generators + ["pretrained"])))
blobs, filters, summaries = {}, {}, []
for f in grid_fractions(cfg):
    per_class = candidates_per_class(cfg, f)
    for g in generators:
        name = synthetic_set_name(g, f)
        blobs[name] = synthesize(gen, g, f, per_class)
        filters[name], summary = filter_candidates(cfg, f, blobs[name], name)
        summaries.append(summary.assign(fraction=f, generator=g))
f0 = min(cfg.downstream.fractions)
blobs[synthetic_set_name("pretrained", f0)] = synthesize(gen, "pretrained", f0, cfg.quality.samples_per_class)
acceptance = pd.concat(summaries, ignore_index=True)
atomic_write_csv(acceptance, paths.table("filtering_acceptance"))'''),
        md("## Table: candidates and kept images per generator and label fraction\n\n"
           "More candidates are generated than the grid needs (`sampling.candidates_factor`), so that enough "
           "survive filtering. **Good:** a high kept share for `histodiffusion`, i.e. most samples are "
           "recognisable as their intended class and are not copies of real images. A low share means few "
           "usable synthetic images, and possibly that guidance does not work at that fraction."),
        code('''kept = acceptance.groupby(["generator", "fraction"])[["candidates", "kept"]].sum()
kept["kept share"] = (kept["kept"] / kept["candidates"]).round(3)
kept'''),
        md("## Figure: real and generated images per class (smallest label fraction)\n\n"
           "Rows are tissue classes; column groups are image sets, three images each: real target training "
           "images (`real`), HistoDiffusion images kept by filtering, best ranked first (`histodiffusion`), "
           "HistoDiffusion candidates before filtering (`histodiffusion_unfiltered`), the other generators' "
           "candidates before filtering (`scratch_unfiltered`, `classifier_free_unfiltered`, when the grid "
           "uses them), and the unguided pre-trained model (`pretrained`: its class is only the request and is "
           "ignored, so it shows what the model makes without guidance). **How to read:** go along a row and "
           "ask whether each generated tile would be called that tissue class. **Good:** `histodiffusion` tiles "
           "show the class's morphology (on NCT-CRC-HE e.g. adipocytes for ADI, dense small lymphocytes for "
           "LYM, atypical glands for TUM) in the stain and texture of the real column."),
        code('''def kept_images(name):
    b, filt = blobs[name], filters[name]
    idx = filt[filt["keep"]].sort_values(["class_id", "rank"])["index"].to_numpy()
    return b["images"][idx], b["labels"][idx]


sets = {"real": (target["train_images"], target["train_labels"])}
if synthetic_set_name("histodiffusion", f0) in filters:
    sets["histodiffusion"] = kept_images(synthetic_set_name("histodiffusion", f0))
for g in ["histodiffusion", "scratch", "classifier_free", "pretrained"]:
    name = synthetic_set_name(g, f0)
    if name in blobs:
        sets[g if g == "pretrained" else f"{g}_unfiltered"] = (blobs[name]["images"], blobs[name]["labels"])
fig = plots.comparison_grid(sets, cfg.data.classes, n=3, title=f"Real and generated images per class, {f0:.0%} labels")
plots.save(fig, cfg, "synthesis_comparison_grid")'''),
        md("## Figure: guidance scale sweep\n\n"
           "HistoDiffusion samples at the smallest label fraction, generated with several guidance scales s "
           "(x axis; s = 0 is no guidance, `sampling.sweep_per_class` images per class). The independent "
           "reference classifier judges them: circles, the share classified as the intended class; squares, "
           "its mean probability for the intended class; dashed, chance; dotted, the scale the study uses. "
           "**Good:** both curves rise well above chance as s grows, and the study's scale sits where they "
           "level off. Very large scales can lower realism (check the images above) even while class accuracy "
           "stays high."),
        code('''sweep = guidance_sweep(gen, f0, ref)
atomic_write_csv(sweep, paths.table("guidance_sweep"))
fig = plots.guidance_sweep(sweep, num_classes=len(cfg.data.classes), default_scale=cfg.sampling.guidance_scale,
                           title=f"Guidance scale sweep, histodiffusion, {f0:.0%} labels")
plots.save(fig, cfg, "guidance_sweep")
sweep.round(3)'''),
        md("## Figure: filtering outcome per class (histodiffusion, smallest label fraction)\n\n"
           "Each bar holds all candidates generated for one class, split by outcome: kept (green), or rejected "
           "because the nearest real class centroid was another class (`wrong centroid`), because the "
           "baseline classifier's confidence in the intended class was below `filtering.tau` (`low "
           "confidence`), or because the image is almost identical to a real training image (`near copy`). "
           "**Good:** mostly green in every class. A class with few kept images receives few synthetic images "
           "in the downstream grid; many near copies mean the generator reproduces the few labeled images."),
        code('''acc0 = acceptance[(acceptance["fraction"] == f0) & (acceptance["generator"] == "histodiffusion")]
if len(acc0):
    fig = plots.filtering_outcomes(acc0, title=f"Filtering outcome per class, histodiffusion, {f0:.0%} labels")
    plots.save(fig, cfg, "filtering_acceptance")
else:
    print("histodiffusion is not in this grid: no filtering figure")'''),
        md("## Figure: t-SNE of real and synthetic features\n\n"
           "A 2-D map (t-SNE) of the baseline-classifier features that filtering used: the real labeled "
           "images of the smallest fraction and every histodiffusion candidate, coloured by filtering outcome "
           "(read from the filtering cache, not recomputed). Nearby points look alike to the classifier; the "
           "axes and the distances between far-apart clusters carry no meaning. **Good:** kept synthetic "
           "points lie among and around the real points and cover all the real clusters (not collapsed onto a "
           "few); rejected points lie between clusters or in the wrong one."),
        code('''name = synthetic_set_name("histodiffusion", f0)
if name in filters:
    points, groups = filter_embedding(cfg, name)
    fig = plots.embedding(points, groups, title=f"t-SNE of baseline-classifier features, {f0:.0%} labels")
    plots.save(fig, cfg, "synthesis_tsne")
write_metrics(cfg, "04_synthesis", {"reference_val": ref_val, "guidance_sweep": sweep.to_dict(orient="records"),
                                    "acceptance": acceptance.to_dict(orient="records")})'''),
    ],
)

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["05_downstream"] = notebook(
    "05 - Downstream classification across label fractions",
    "Trains the downstream tissue classifier (timm, from scratch, flips / 90-degree rotations / colour "
    "jitter) on each cell of the grid: label fraction x training set x synthetic-to-real ratio x seed. Model "
    "selection uses the validation split only; the test set is evaluated once per cell. Each cell carries a "
    "content key of its inputs: finished cells are reused, and a cell whose inputs changed (e.g. a "
    "re-generated synthetic set) is recomputed.",
    '''from IPython.display import Markdown, display

from hdlib import plots
from hdlib.io import atomic_write_csv
from hdlib.paths import TRAINING_SETS
from hdlib.stages.common import write_metrics
from hdlib.stages.downstream import run_downstream_grid
from hdlib.stats import grid_summary''',
    [
        code('''display(Markdown("Training sets in this grid (each adds its synthetic images to the same real labeled "
                 "images):\\n\\n" + "\\n".join(f"- `{s}`: {TRAINING_SETS[s]}" for s in cfg.downstream.training_sets)))
results = run_downstream_grid(cfg)
computed, stale = results.attrs["computed"], results.attrs["stale_recomputed"]
n_cells = results["id"].nunique()
print(f"{n_cells} grid cells: {n_cells - len(computed)} reused from an earlier run, "
      f"{len(computed) - len(stale)} computed for the first time, {len(stale)} recomputed because an input changed")
atomic_write_csv(results.drop(columns=[c for c in results.columns if "confusion" in c or c == "study_dir"]),
                 paths.table("downstream_grid_raw"))'''),
        md("## Table: test accuracy per training set and label fraction\n\n"
           "Main grid (`downstream.ratio` synthetic images per real one, 0 for `real`): mean, standard "
           "deviation and 95% confidence interval (Student t) over the seeds; `n` is the number of seeds. "
           "Balanced accuracy and macro-F1 are written to `tables/` and the report."),
        code('''main = results[results["ratio"].isin([0.0, cfg.downstream.ratio]) & results["fraction"].isin(cfg.downstream.fractions)]
tables = {}
for metric in ["test.accuracy", "test.balanced_accuracy", "test.macro_f1"]:
    tables[metric] = grid_summary(main, metric)
    short = metric.split(".")[1]
    atomic_write_csv(tables[metric][0], paths.table(f"downstream_{short}"))
    atomic_write_csv(tables[metric][1], paths.table(f"downstream_{short}_vs_real"))
summary, comps = tables["test.accuracy"]
summary.round(4)'''),
        md("## Figure: test accuracy vs label fraction\n\n"
           "One line per training set: mean test accuracy over seeds against the labeled fraction (log "
           "scale); the shaded band is the 95% confidence interval. **Good (the paper's claim):** "
           "`histodiffusion` above `real`, with the largest gap at the smallest fractions and the gap closing "
           "as labels become plentiful; `histodiffusion` above `histodiffusion_unfiltered` shows the value of "
           "filtering, above `scratch` the value of pre-training on unlabeled data."),
        code('''fig = plots.accuracy_vs_fraction(summary, "test accuracy")
plots.save(fig, cfg, "downstream_accuracy_vs_fraction")'''),
        md("## Table: paired comparison against real-only\n\n"
           "For each setting, the accuracy difference to `real` trained on the same labeled images with the "
           "same seed (`mean_diff`, in accuracy units: 0.02 = 2 points), its 95% CI, the paired t-test "
           "p-value and the Wilcoxon signed-rank p-value (NaN with fewer than 6 seeds). **How to read:** a CI "
           "entirely above 0 is a reliable gain, entirely below 0 a reliable loss; a CI containing 0 is "
           "inconclusive with this many seeds."),
        code("comps.round(4)"),
        md("## Figure: how many synthetic images to add\n\n"
           "Test accuracy at the ratio-sweep label fraction against the number of synthetic images added, as a "
           "percentage of the real labeled images (100% doubles the training set); mean and 95% CI over "
           "seeds. The grey line and band are real-only. **Good:** accuracy rises above the grey band and "
           "levels off; a drop at high ratios means synthetic images start to drown the real signal."),
        code('''sweep = results[(results["fraction"] == cfg.downstream.ratio_sweep_fraction)
                & results["training_set"].isin(list(cfg.downstream.ratio_sweep_sets) + ["real"])]
ratio_summary, ratio_comps = grid_summary(sweep, "test.accuracy")
atomic_write_csv(ratio_summary, paths.table("downstream_ratio_sweep"))
atomic_write_csv(ratio_comps, paths.table("downstream_ratio_sweep_vs_real"))
fig = plots.ratio_sweep(ratio_summary, "test accuracy",
                        title=f"Synthetic-to-real ratio at {cfg.downstream.ratio_sweep_fraction:.0%} labels")
plots.save(fig, cfg, "downstream_ratio_sweep")
ratio_summary.round(4)'''),
        md("## Figures: confusion matrices at the smallest label fraction (first seed)\n\n"
           "Rows are the true class, columns the predicted class; each row sums to 1, so the diagonal is each "
           "class's recall. One matrix for `real` and one for `histodiffusion`. **Good:** a strong diagonal. "
           "Comparing the two shows which classes the synthetic images help (diagonal up) and which they "
           "confuse (off-diagonal up), e.g. pairs that are also hard for pathologists such as stroma vs "
           "muscle or debris vs mucus."),
        code('''f0 = min(cfg.downstream.fractions)
picks = results[(results["fraction"] == f0) & (results["seed"] == cfg.downstream.seeds[0])
                & results["training_set"].isin(["real", "histodiffusion"])
                & results["ratio"].isin([0.0, cfg.downstream.ratio])]
for _, r in picks.iterrows():
    fig = plots.confusion(r["test.confusion_matrix"], cfg.data.classes,
                          title=f"{r['training_set']}, {f0:.0%} labels, seed {r['seed']}")
    plots.save(fig, cfg, f"downstream_confusion_{r['training_set']}")'''),
        code('''write_metrics(cfg, "05_downstream", {
    "accuracy": tables["test.accuracy"][0].to_dict(orient="records"),
    "accuracy_vs_real": tables["test.accuracy"][1].to_dict(orient="records"),
    "balanced_accuracy": tables["test.balanced_accuracy"][0].to_dict(orient="records"),
    "macro_f1": tables["test.macro_f1"][0].to_dict(orient="records"),
    "ratio_sweep": ratio_summary.to_dict(orient="records"),
    "ratio_sweep_vs_real": ratio_comps.to_dict(orient="records"),
    "cells": int(n_cells), "cells_computed": len(computed), "cells_stale_recomputed": len(stale)})'''),
    ],
)

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["06_quality"] = notebook(
    "06 - Generation quality",
    "FID and KID (torchmetrics), overall and per class, and precision / recall of each synthetic set at the "
    "smallest label fraction, against the real test set. Features come from the reference classifier trained "
    "once on all the target's training labels (no Inception weights are downloadable here; give "
    "`quality.inception_weights` a local file to add Inception FID), so the values compare the sets of this "
    "study with each other, not with FID values published for Inception features.",
    '''from hdlib import plots
from hdlib.downstream import extract_features
from hdlib.io import atomic_write_csv
from hdlib.stages.common import write_metrics
from hdlib.stages.data import load_target
from hdlib.stages.quality import quality_sets, quality_table
from hdlib.stages.synthesis import reference_classifier''',
    [
        code('''ref = reference_classifier(cfg)


def features(x):
    return extract_features(ref, x, batch_size=128, device=device(cfg)).numpy()


target = load_target(cfg)
sets = {"real (val)": (target["val_images"], target["val_labels"])} | quality_sets(cfg)
overall, per_class = quality_table(cfg, target["test_images"], target["test_labels"].numpy(), sets, features)
atomic_write_csv(overall, paths.table("quality_overall"))
atomic_write_csv(per_class, paths.table("quality_per_class"))'''),
        md("## Table: overall generation quality\n\n"
           "Each row is an image set compared with the real test set: `real (val)` (real images: the floor a "
           "perfect generator would reach with this many images), the filtered sets the downstream classifier "
           "is trained on (`histodiffusion`, `scratch`, `classifier_free`), the same candidates before "
           "filtering (`*_unfiltered`) and unguided samples (`pretrained`). FID and KID measure how far the "
           "generated images' feature distribution is from the real one (lower is better; KID is less biased "
           "for small sets, `kid_std` is its spread over random subsets). Precision is the share of generated "
           "images that fall within the range of real ones (realism), recall the share of real images whose "
           "neighbourhood contains generated ones (diversity); both 0 to 1, higher is better. **Good:** "
           "`histodiffusion` closer to `real (val)` than the other generators, with high precision and "
           "recall."),
        code("overall.round(4)"),
        md("## Figure: FID per image set\n\n"
           "Overall FID of each set from the table above (lower is better; `real (val)` is the floor). "
           "**Good:** `histodiffusion` the lowest generated set, ideally close to `real (val)`."),
        code('''fig = plots.bar(overall.dropna(subset=["fid"]), x="set", y="fid", ylabel="FID (lower is better)",
                title="FID to the real test set (reference-classifier features)")
plots.save(fig, cfg, "quality_fid")'''),
        md("## Figure: KID per image set\n\n"
           "Overall KID of each set (mean over random subsets; the error bar is its std over the subsets). "
           "Lower is better; sets whose error bars overlap are not clearly different."),
        code('''fig = plots.bar(overall.dropna(subset=["kid_mean"]), x="set", y="kid_mean", err="kid_std",
                ylabel="KID (lower is better)", title="KID to the real test set (mean and std over subsets)")
plots.save(fig, cfg, "quality_kid")'''),
        md("## Table: FID per class\n\n"
           "FID between the generated images of one class (columns: image sets) and the real test images of "
           "the same class (rows). Per-class sets are small, which biases FID upwards: compare the sets "
           "within a row rather than absolute values. **Good:** `histodiffusion` low in every class; a class "
           "where every generator is high is one the models have not learned to draw."),
        code('''per_class.pivot(index="class", columns="set", values="fid").round(3) if len(per_class) else per_class'''),
        md("## Figure: FID per class\n\n"
           "The table above as bars: for each class, one bar per image set. **How to read:** within each "
           "class, the shortest bar is the set closest to the real images of that class."),
        code('''if len(per_class):
    fig = plots.bar(per_class, x="class", y="fid", hue="set", ylabel="FID (lower is better)",
                    title="FID per class to the real test images")
    plots.save(fig, cfg, "quality_fid_per_class")
else:
    print("too few images per class for per-class metrics")'''),
        md("## Figure: KID per class\n\n"
           "KID (mean over random subsets) per class and image set, read like the FID figure above; KID is "
           "less biased than FID for the small per-class sets, so it is the better of the two for comparing "
           "classes with each other."),
        code('''if len(per_class):
    fig = plots.bar(per_class, x="class", y="kid_mean", hue="set", ylabel="KID (lower is better)",
                    title="KID per class to the real test images")
    plots.save(fig, cfg, "quality_kid_per_class")
else:
    print("too few images per class for per-class metrics")'''),
        md("## Inception FID (only with a local weights file)\n\n"
           "The FID usually reported in papers, for the filtered `histodiffusion` set."),
        code('''inception = None
if cfg.quality.inception_weights and "histodiffusion" in sets:
    from hdlib.metrics import inception_fid

    inception = inception_fid(target["test_images"], sets["histodiffusion"][0], cfg.quality.inception_weights)
    print("Inception FID (histodiffusion):", inception)
else:
    print("Inception FID skipped (quality.inception_weights is empty, or no histodiffusion set)")
write_metrics(cfg, "06_quality", {"overall": overall.to_dict(orient="records"),
                                  "per_class": per_class.to_dict(orient="records"),
                                  "inception_fid": inception})'''),
    ],
)

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["07_report"] = notebook(
    "07 - Report",
    "Assembles `REPORT.md` in the study's results folder from the metrics and tables the earlier stages "
    "wrote: parameters, timings, the accuracy table and figure, FID/KID, filtering and guidance. No number is "
    "typed in by hand. Figure links are relative to the results folder: open `REPORT.md` there to see them.",
    '''from IPython.display import Markdown, display

from hdlib.stages.report import build_report''',
    [
        code('''report = build_report(cfg)
display(Markdown(report.read_text()))'''),
    ],
)


def main():
    for name, nb in NOTEBOOKS.items():
        for i, cell in enumerate(nb.cells):  # stable ids: rebuilding changes nothing unless cells change
            cell["id"] = f"{name}-{i:02d}"
        nbf.write(nb, HERE / f"{name}.ipynb")
        print("wrote", f"notebooks/{name}.ipynb")


if __name__ == "__main__":
    main()

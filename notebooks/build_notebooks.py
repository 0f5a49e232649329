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
    "study can be re-run on exactly the same images. The manifests are the index every later stage streams "
    "images from (no stage holds a whole dataset in memory). Nothing is trained here.",
    '''import numpy as np
import pandas as pd

from hdlib import plots
from hdlib.io import atomic_write_csv
from hdlib.stages.data import load_split_images, prepare_data, split_labels, split_sources''',
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
           "cells the number of labeled images per class (first label draw; every downstream seed re-draws "
           "the subset with the same sizes). Subsets are nested (every image labeled at the smallest fraction "
           "is also labeled at the larger ones) and stratified, so class proportions are preserved. "
           "**Check:** every class has at least one labeled image at the smallest fraction; with only a "
           "handful per class, results at that fraction vary a lot between seeds."),
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
        code('''labels = split_labels(cfg, "target_train").numpy()
rows = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(len(cfg.data.classes))])
images, image_labels = load_split_images(cfg, "target_train", rows)
fig = plots.per_class_rows(images, image_labels, cfg.data.classes, n=10,
                           title="Labeled target: training images per class")
plots.save(fig, cfg, "data_target_per_class")'''),
        md("## Figure: unlabeled pool, tiles per source\n\n"
           "Each row is one source of the unlabeled pool: the images the autoencoder and the unconditional "
           "diffusion model learn from. **Good:** tissue-rich tiles with varied morphology. Stain or scanner "
           "differences from the target are expected (the study asks whether pre-training on other data "
           "helps); tiles that are mostly glass, pen marks or out of focus mean the tissue filter "
           "(`data.tissue_threshold`) is too lax."),
        code('''sources = np.array(split_sources(cfg, "pool"))
rows = {name: load_split_images(cfg, "pool", np.flatnonzero(sources == name)[:10])[0] for name in dict.fromkeys(sources)}
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
    '''import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from hdlib import plots, train
from hdlib.stages.autoencoder import autoencoder_stage, latent_store, reconstruction_examples, training_log''',
    [
        md("## Which autoencoder this study uses"),
        code('''if cfg.pretrained.path:
    display(Markdown(f"**Pre-trained autoencoder, loaded from `{cfg.pretrained.path}`** (not trained in this "
                     "study; its latent scale factor comes with it)."))
else:
    train.launch_task(cfg, params_file, overrides, "autoencoder")
    display(Markdown("**Autoencoder trained in this study** on the unlabeled pool (settings: `autoencoder`)."))'''),
        md("## Table: latent space summary\n\n"
           "Every split is encoded once, streaming, into a memory-mapped cache of posterior means and standard "
           "deviations (float16; training draws a fresh posterior sample each time). The latent shape (channels x height x width) says how much each tile is compressed; the scaled "
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
        code('''store = latent_store(cfg)
sample = store.means("pool", np.arange(min(4096, len(store.mean("pool")))))
fig = plots.latent_histograms(sample, title="Scaled pool latents per channel (up to 4096 tiles)")
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
    '''import torch
from IPython.display import Markdown, display

from hdlib import plots, train
from hdlib.io import atomic_write_csv
from hdlib.paths import model_name
from hdlib.stages.autoencoder import training_log
from hdlib.stages.common import write_metrics
from hdlib.stages.data import grid_fractions, load_split_images, split_images
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
f0, d0 = min(cfg.downstream.fractions), cfg.downstream.seeds[0]
# adaptation candidates at the smallest fraction and first draw: stage 04 chooses on validation
# (and trains the chosen adaptation for the other fractions and draws)
if "labeled" in cfg.diffusion.adaptations:
    train.launch_task(cfg, params_file, overrides, "denoiser_adapted", fraction=f0, adaptation="labeled", draw=d0)
if "target_unlabeled" in cfg.diffusion.adaptations:
    train.launch_task(cfg, params_file, overrides, "denoiser_adapted", adaptation="target_unlabeled")
# the from-scratch ablation (when the grid uses it): smallest fraction, every label draw
needed = set(cfg.downstream.training_sets) | set(cfg.downstream.ratio_sweep_sets)
if "scratch" in needed:
    for d in cfg.downstream.seeds:
        train.launch_task(cfg, params_file, overrides, "denoiser_scratch", fraction=f0, draw=d)'''),
        md("## Figure: denoiser training loss\n\n"
           "Training loss (log scale, smoothed) of each denoiser trained here, at the smallest label fraction, "
           "named as in `models/`: `denoiser_pretrained` (pool), `denoiser_adapted_*` (fine-tuned on the "
           "target), `denoiser_scratch_*` (labeled fraction only). Diffusion losses are noisy and fall slowly: "
           "compare the level reached rather than single steps. **Expect** the adapted model to start low (it "
           "starts from the pre-trained weights); a from-scratch model with very few images can reach a low "
           "loss by memorising them, which is not a sign of quality (see the samples below)."),
        code('''models = ["denoiser_pretrained"]
if "labeled" in cfg.diffusion.adaptations:
    models.append(model_name("denoiser_adapted", f0, "labeled", draw=d0))
if "target_unlabeled" in cfg.diffusion.adaptations:
    models.append(model_name("denoiser_adapted", adaptation="target_unlabeled"))
if "scratch" in needed:
    models.append(model_name("denoiser_scratch", f0, draw=d0))
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
        code('''n = cfg.diffusion.preview_samples
samples = {m: images for m, (_, images) in unconditional_samples(cfg, models, n, "uncond").items()}
pick = torch.randperm(len(split_images(cfg, "target_train")), generator=torch.Generator().manual_seed(cfg.study.seed))[:n]
samples["real target"] = load_split_images(cfg, "target_train", pick.numpy())[0]
fig = plots.image_rows(samples, n=n, title="Unconditional samples (same seeds in every row)")
plots.save(fig, cfg, "diffusion_samples")'''),
        md("## Table: which data each model imitates\n\n"
           "Frechet distance between simple latent statistics (per-channel mean, std and gradient energy) of "
           "`diffusion.realism_samples` samples of each model (rows) and of each real source (columns: the pool sources and the "
           "target). Lower is closer. **How to read:** in each row, the smallest value names the data the "
           "model's samples resemble most; adapted models should be closer to `target` than the pre-trained "
           "one. A coarse check, not an image-quality metric (FID and KID follow in 06_quality)."),
        code('''n_check = cfg.diffusion.realism_samples
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
    "every t). With `latent_classifier.backbone: pretrained_unet` (the default study) the classifier is the "
    "frozen encoder half of the pre-trained denoiser with a small trained head: features learned without "
    "labels on the whole pool make it far more accurate from a few labels than one trained from scratch "
    "(`scratch`, guided-diffusion's EncoderUNet shape). During sampling its gradient pushes each denoising step "
    "towards the requested class. For the "
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
        code('''fractions, f0, d0 = grid_fractions(cfg), min(cfg.downstream.fractions), cfg.downstream.seeds[0]
needed = set(cfg.downstream.training_sets) | set(cfg.downstream.ratio_sweep_sets)
for d in cfg.downstream.seeds:  # each seed re-draws the labeled subset, so its own classifiers
    for f in fractions:
        train.launch_task(cfg, params_file, overrides, "latent_classifier", fraction=f, draw=d)
    if "classifier_free" in needed:  # the classifier-free baseline, when the grid uses it
        train.launch_task(cfg, params_file, overrides, "denoiser_classifier_free", fraction=f0, draw=d)'''),
        md("## Table: model selection of the latent classifiers\n\n"
           "Each latent classifier is scored on validation latents noised to fixed t during training, and the "
           "weights with the best mean accuracy over t < 500 are kept (early stopping by t). One row per "
           "fraction and label draw: the selected step and its validation accuracies. **Good:** well above "
           "chance (1 / number of classes) at t < 500."),
        code('''import pandas as pd

sel = []
for d in cfg.downstream.seeds:
    for f in fractions:
        ev = pd.read_csv(paths.model(model_name("latent_classifier", f, draw=d)) / "eval.csv")
        best = ev.loc[ev["val_acc_t_lt_500"].idxmax()]
        sel.append({"fraction": f, "draw": d, "selected_step": int(best["step"]),
                    "val_acc_t_lt_500": best["val_acc_t_lt_500"], "val_acc_all_t": best["val_acc_all_t"]})
selection = pd.DataFrame(sel)
atomic_write_csv(selection, paths.table("latent_classifier_selection"))
selection.round(3)'''),
        md("## Figure: latent-classifier accuracy by noise level\n\n"
           "Validation accuracy of each fraction's latent classifier (one line per label fraction) on "
           "validation latents noised to timestep t (x axis: 0 = clean, right = almost pure noise); dashed: "
           "chance (1 / number of classes). **How to read:** guidance can only steer where the classifier is "
           "better than chance. **Good:** high accuracy at small t, falling smoothly towards chance at large "
           "t, and higher lines for larger label fractions. A line at chance everywhere means guidance will "
           "not produce the requested classes."),
        code('''acc = accuracy_by_t(cfg, fractions, draw=d0)
atomic_write_csv(acc, paths.table("latent_classifier_accuracy_by_t"))
write_metrics(cfg, "03_guidance", {"accuracy_by_t": acc.to_dict(orient="records"),
                                   "selection": selection.to_dict(orient="records")})
fig = plots.latent_classifier_accuracy(acc, num_classes=len(cfg.data.classes))
plots.save(fig, cfg, "latent_classifier_accuracy_by_t")'''),
        md("## Figure: training loss of the latent classifiers and classifier-free denoisers\n\n"
           "Cross-entropy of the latent classifiers and denoising loss of the class-conditional "
           "(classifier-free) denoisers, log scale, one line per model (named as in `models/`). **Good:** "
           "decreasing curves. With few labels, a classifier loss that falls to almost zero means the "
           "classifier has memorised its few training latents; the validation accuracy above shows whether it "
           "still generalises."),
        code('''names = [model_name("latent_classifier", f, draw=d0) for f in fractions]
if "classifier_free" in needed:
    names.append(model_name("denoiser_classifier_free", f0, draw=d0))
logs = {n: training_log(cfg, n) for n in names}
fig = plots.loss_curves(logs, title="Latent classifier and classifier-free denoiser training loss")
plots.save(fig, cfg, "guidance_loss")'''),
    ],
)

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["04_synthesis"] = notebook(
    "04 - Class-specific synthesis and selective filtering",
    "First the guidance scale and the adaptation are chosen on the validation split (never on test). Then, "
    "for every label fraction and label draw, each generator the grid needs fills an exact per-class quota: "
    "candidates are generated in rounds and filtered with the real-only baseline classifier of that labeled "
    "subset (nearest class centroid = intended class, confidence >= `filtering.tau`, and not a near copy of "
    "a labeled image, with the near-copy distance calibrated per class on real validation images), until "
    "each class has its quota or reached the cap; any shortfall is reported. Kept images are ranked by "
    "distance to their class centroid. Images are written as PNGs with a manifest, so they can be used by "
    "any training code.",
    '''import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

from hdlib import plots, train
from hdlib.downstream import evaluate
from hdlib.io import atomic_write_csv
from hdlib.paths import GENERATORS, synthetic_set_name
from hdlib.stages.common import write_metrics
from hdlib.stages.data import load_split_images, split_images, split_labels
from hdlib.stages.synthesis import (generators_needed, load_set, reference_classifier, set_images,
                                    synthesis_stage)''',
    [
        md("## The reference classifier (an independent judge)\n\n"
           "Trained once on *all* of the target's training labels. It never decides anything; it judges the "
           "class of generated images (the `guided_class_accuracy` below) and gives the feature space for FID "
           "/ KID (06_quality). Its validation accuracy bounds how well it can judge."),
        code('''ref = reference_classifier(cfg)
ref_val = evaluate(ref, split_images(cfg, "target_val"), split_labels(cfg, "target_val"),
                   num_classes=len(cfg.data.classes), class_names=list(cfg.data.classes), device=device(cfg))
print(f"reference classifier (all training labels): validation accuracy {ref_val['accuracy']:.3f}")'''),
        md("## Choice on validation, generation and filtering"),
        code('''display(Markdown("Generators:\\n\\n" + "\\n".join(f"- `{g}`: {GENERATORS[g]}"
                                                   for g in generators_needed(cfg) + ["pretrained"])))


def train_model(task, fraction, adaptation, draw):
    train.launch_task(cfg, params_file, overrides, task, fraction=fraction, adaptation=adaptation, draw=draw)


metrics = synthesis_stage(cfg, train_model=train_model)
metrics["reference_val"] = ref_val
write_metrics(cfg, "04_synthesis", metrics)
accounting = pd.DataFrame(metrics["accounting"])
f0, d0 = min(cfg.downstream.fractions), cfg.downstream.seeds[0]
print(f"chosen on validation: guidance scale {metrics['guidance_scale']:g}, adaptation `{metrics['adaptation']}`; "
      f"reference classifier's class accuracy of the chosen samples: {metrics['guided_class_accuracy']:.3f}")'''),
        md("## Figure: choosing the guidance scale and adaptation on validation\n\n"
           "Each point is a small HistoDiffusion sample (`sampling.sweep_per_class` per class) at the "
           "smallest fraction and first label draw, for one guidance scale (x axis, s = 0 is no guidance) and "
           "adaptation (line). Circles: the share whose nearest *validation* class centroid is the intended "
           "class (the choice is made on this); squares: the independent reference classifier's accuracy "
           "(reported only). **Good:** both well above chance (dashed) at the chosen scale (dotted); the "
           "choice is the smallest scale within 0.02 of the best validation agreement."),
        code('''sel = pd.DataFrame(metrics["selection_table"])
if len(sel):
    fig = plots.guidance_selection(sel, num_classes=len(cfg.data.classes), chosen=metrics["guidance_scale"])
    plots.save(fig, cfg, "guidance_sweep")
sel.round(3)'''),
        md("## Table: a faster sampler with the same guidance\n\n"
           "The chosen guidance (scale, adaptation, latent classifier) run by each sampler of "
           "`sampling.sampler_comparison` (`method:steps`; DDIM, or DPM-Solver++ 2nd-order multistep) on the "
           "same request (`sampling.sweep_per_class` per class, same seeds). Columns: "
           "validation agreement, the reference classifier's class accuracy, the Frechet distance to the "
           "validation images in the baseline classifier's features (lower is closer; biased upwards at this "
           "sample size, so compare rows, not studies) and seconds per image. **Good:** DPM-Solver++ in few "
           "steps matches DDIM's accuracy and distance at a fraction of its time (then `sampling.method: "
           "dpm_solver` is worth it)."),
        code('''comparison = pd.DataFrame(metrics["sampler_comparison"])
comparison.round(3) if len(comparison) else Markdown("(not run: `sampling.sampler_comparison` is empty)")'''),
        md("## Table: requested vs achieved synthetic images\n\n"
           "Per generator, fraction and label draw: the images requested (the largest synthetic-to-real ratio "
           "used at that fraction x each class's real count), the images kept, the candidates generated, the "
           "shortfall (classes that hit the cap `sampling.max_candidates_factor` x quota) and the near copies "
           "found. **Good:** no shortfall; a shortfall means the downstream cells of that setting received "
           "fewer synthetic images than their ratio says (the grid table reports the achieved counts)."),
        code('''summary = accounting.groupby(["generator", "fraction", "draw"])[["requested", "achieved", "candidates",
                                                                "shortfall", "near_copies"]].sum()
summary["kept share"] = (summary["achieved"] / summary["candidates"]).round(3)
atomic_write_csv(summary.reset_index(), paths.table("synthesis_accounting_summary"))
summary'''),
        md("## Figure: real and generated images per class (smallest label fraction, first draw)\n\n"
           "Rows are tissue classes; column groups are image sets, three images each: real target training "
           "images (`real`), HistoDiffusion images kept by filtering, best ranked first (`histodiffusion`), "
           "the same generator's first candidates before filtering (`histodiffusion_unfiltered`), the "
           "ablation generators' kept images, and the unguided pre-trained model (`pretrained`: its class is "
           "only the request). **How to read:** go along a row and ask whether each generated tile would be "
           "called that tissue class. **Good:** `histodiffusion` tiles show the class's morphology in the "
           "stain and texture of the real column."),
        code('''labels = split_labels(cfg, "target_train").numpy()
rows = np.concatenate([np.flatnonzero(labels == k)[:3] for k in range(len(cfg.data.classes))])
sets = {"real": load_split_images(cfg, "target_train", rows)}


def first(frame, kept, n=3):
    g = frame[frame["kept"]].sort_values(["label", "rank"]) if kept else frame.sort_values(["label", "index"])
    g = g.groupby("label").head(n)
    ds = set_images(cfg, g)
    if len(ds) == 0:  # nothing kept: the set is shown empty
        return np.zeros((0, 3, cfg.data.image_size, cfg.data.image_size), np.uint8), np.zeros(0, np.int64)
    return (np.stack([ds[i][0].numpy() for i in range(len(ds))]), g["label"].to_numpy())


for g, kept, label in [("histodiffusion", True, "histodiffusion"), ("histodiffusion", False, "histodiffusion_unfiltered"),
                       ("scratch", True, "scratch"), ("classifier_free", True, "classifier_free"),
                       ("pretrained", False, "pretrained")]:
    name = synthetic_set_name(g, f0, d0)
    if (paths.synthetic(name) / "manifest.csv").exists():
        x, y = first(load_set(cfg, name), kept)
        sets[label] = (torch.from_numpy(x), torch.from_numpy(y))
fig = plots.comparison_grid(sets, cfg.data.classes, n=3, title=f"Real and generated images per class, {f0:.0%} labels")
plots.save(fig, cfg, "synthesis_comparison_grid")'''),
        md("## Figure: filtering outcome per class (histodiffusion, smallest label fraction, first draw)\n\n"
           "Each bar holds all candidates generated for one class, split by outcome: kept, over quota "
           "(accepted but not needed), or rejected because the nearest real class centroid was another class "
           "(`wrong_centroid`), because the baseline classifier's confidence was below `filtering.tau` "
           "(`low_confidence`), or because it is a near copy of a labeled image (`near_copy`). **Good:** "
           "mostly kept or over quota in every class; many near copies mean the generator reproduces the few "
           "labeled images."),
        code('''hd = load_set(cfg, synthetic_set_name("histodiffusion", f0, d0))
outcome = hd.pivot_table(index="class_name", columns="decision", values="index", aggfunc="count",
                         fill_value=0).reindex(cfg.data.classes, fill_value=0).reset_index()
fig = plots.filtering_outcomes(outcome, title=f"Filtering outcome per class, histodiffusion, {f0:.0%} labels")
plots.save(fig, cfg, "filtering_acceptance")
outcome'''),
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
    "cells": int(n_cells), "cells_computed": len(computed), "cells_stale_recomputed": len(stale),
    # the issue's headline: filtered HistoDiffusion vs real-only at the smallest fraction, paired over seeds
    "smallest_fraction_histodiffusion_vs_real": next(
        (r for r in tables["test.accuracy"][1].to_dict(orient="records") if r["fraction"] == f0
         and r["training_set"] == "histodiffusion" and r["ratio"] == cfg.downstream.ratio), None)})'''),
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
import numpy as np
import pandas as pd

from hdlib.stages.data import split_images, split_labels
from hdlib.stages.quality import nearest_training_examples, quality_sets, quality_table
from hdlib.stages.synthesis import reference_classifier, set_images''',
    [
        code('''ref = reference_classifier(cfg)


def features(x):
    return extract_features(ref, x, batch_size=128, device=device(cfg)).numpy()


sets, per_class_n = quality_sets(cfg)
val = split_images(cfg, "target_val")
val_labels = split_labels(cfg, "target_val").numpy()
val_rows = np.concatenate([np.flatnonzero(val_labels == k)[:per_class_n] for k in range(len(cfg.data.classes))])
real_val = pd.read_csv(paths.manifest("target_val"), keep_default_na=False).iloc[val_rows]
sets = {"real (val)": real_val} | sets
print(f"every set cut to {per_class_n} images per class ({per_class_n * len(cfg.data.classes)} in all)")
overall, per_class = quality_table(cfg, sets, features)
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
        code('''if "fid" in overall:
    fig = plots.bar(overall.dropna(subset=["fid"]), x="set", y="fid", ylabel="FID (lower is better)",
                    title="FID to the real test set (reference-classifier features)")
    plots.save(fig, cfg, "quality_fid")
else:
    print("too few images for FID")'''),
        md("## Figure: KID per image set\n\n"
           "Overall KID of each set (mean over random subsets; the error bar is its std over the subsets). "
           "Lower is better; sets whose error bars overlap are not clearly different."),
        code('''if "kid_mean" in overall:
    fig = plots.bar(overall.dropna(subset=["kid_mean"]), x="set", y="kid_mean", err="kid_std",
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

    from hdlib.datasets import load_into_memory

    real_test = load_into_memory(split_images(cfg, "target_test"))[0]
    inception = inception_fid(real_test, load_into_memory(set_images(cfg, sets["histodiffusion"]))[0],
                              cfg.quality.inception_weights)
    print("Inception FID (histodiffusion):", inception)
else:
    print("Inception FID skipped (quality.inception_weights is empty, or no histodiffusion set)")
write_metrics(cfg, "06_quality", {"overall": overall.to_dict(orient="records"),
                                  "per_class": per_class.to_dict(orient="records"),
                                  "images_per_class": int(per_class_n), "inception_fid": inception})'''),
        md("## Figure: memorisation check: the closest samples and their nearest labeled image\n\n"
           "For each generator, pairs of rows: the candidates closest (in the baseline classifier's feature "
           "space) to one of the labeled training images, and below each, that training image. **How to "
           "read:** near-identical pairs are copies, not new images; the filter drops candidates closer than "
           "the per-class threshold calibrated on real images (the near-copy rate per generator is in "
           "04_synthesis). **Good:** the pairs share the class but differ in layout, cells and texture. "
           "Generators trained only on the few labeled images (`scratch`, `classifier_free`) are the usual "
           "offenders."),
        code('''pairs = nearest_training_examples(cfg, n=8)
if pairs:
    fig = plots.image_rows(pairs, n=8, title="Closest synthetic samples (odd rows) and their nearest labeled image")
    plots.save(fig, cfg, "quality_nearest_training")
else:
    print("no filtered set with near-copy distances")'''),
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

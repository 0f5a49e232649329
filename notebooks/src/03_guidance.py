# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 - Noise-aware latent classifier and the classifier-free baseline
#
# Guidance steers the unconditional model towards a tissue class. For each label fraction, a latent classifier learns to recognise the class from *noised* latents z_t at random noise levels t, conditioned on t (noise-aware; the authors' release trained it on clean latents only and queried it at every t). With `latent_classifier.backbone: pretrained_unet` (the default study) the classifier is the frozen encoder half of the pre-trained denoiser with a small trained head: features learned without labels on the whole pool make it far more accurate from a few labels than one trained from scratch (`scratch`, guided-diffusion's EncoderUNet shape). During sampling its gradient pushes each denoising step towards the requested class. For the classifier-free-guidance baseline (`classifier_free`), a class-conditional denoiser is trained on the labeled fraction, with the label dropped at random (`diffusion.classifier_free_label_dropout`).

# %% tags=["parameters"]
# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []

# %%
from hdlib import plots, train
from hdlib.io import atomic_write_csv
from hdlib.paths import StudyPaths, model_name
from hdlib.stages.common import setup_notebook
from hdlib.stages.guidance import accuracy_by_t
from hdlib.study.context import write_metrics
from hdlib.study.latents import training_log
from hdlib.study.splits import grid_fractions

cfg = setup_notebook(params_file, overrides)  # prints where results go and the device
paths = StudyPaths(cfg)

# %%
fractions, f0, d0 = grid_fractions(cfg), min(cfg.downstream.fractions), cfg.downstream.seeds[0]
needed = set(cfg.downstream.training_sets) | set(cfg.downstream.ratio_sweep_sets)
for d in cfg.downstream.seeds:  # each seed re-draws the labeled subset, so its own classifiers
    for f in fractions:
        train.launch_task(cfg, params_file, overrides, "latent_classifier", fraction=f, draw=d)
    if "classifier_free" in needed:  # the classifier-free baseline, when the grid uses it
        train.launch_task(cfg, params_file, overrides, "denoiser_classifier_free", fraction=f0, draw=d)

# %% [markdown]
# ## Table: model selection of the latent classifiers
#
# Each latent classifier is scored on validation latents noised to fixed t during training, and the weights with the best mean accuracy over t < 500 are kept (early stopping by t). One row per fraction and label draw: the selected step and its validation accuracies. **Good:** well above chance (1 / number of classes) at t < 500.

# %%
import pandas as pd

sel = []
for d in cfg.downstream.seeds:
    for f in fractions:
        ev = pd.read_csv(paths.model(model_name("latent_classifier", f, draw=d)) / "eval.csv")
        best = ev.loc[ev["val_acc_t_lt_500"].idxmax()]
        sel.append({"fraction": f, "draw": d, "selected_step": int(best["step"]),
                    "val_acc_t_lt_500": best["val_acc_t_lt_500"], "val_acc_all_t": best["val_acc_all_t"]})
selection = pd.DataFrame(sel)
atomic_write_csv(selection, paths.table("latent_classifier_selection"))
selection.round(3)

# %% [markdown]
# ## Figure: latent-classifier accuracy by noise level
#
# Validation accuracy of each fraction's latent classifier (one line per label fraction) on validation latents noised to timestep t (x axis: 0 = clean, right = almost pure noise); dashed: chance (1 / number of classes). **How to read:** guidance can only steer where the classifier is better than chance. **Good:** high accuracy at small t, falling smoothly towards chance at large t, and higher lines for larger label fractions. A line at chance everywhere means guidance will not produce the requested classes.

# %%
acc = accuracy_by_t(cfg, fractions, draw=d0)
atomic_write_csv(acc, paths.table("latent_classifier_accuracy_by_t"))
write_metrics(cfg, "03_guidance", {"accuracy_by_t": acc.to_dict(orient="records"),
                                   "selection": selection.to_dict(orient="records")})
fig = plots.latent_classifier_accuracy(acc, num_classes=len(cfg.data.classes))
plots.save(fig, cfg, "latent_classifier_accuracy_by_t")

# %% [markdown]
# ## Figure: training loss of the latent classifiers and classifier-free denoisers
#
# Cross-entropy of the latent classifiers and denoising loss of the class-conditional (classifier-free) denoisers, log scale, one line per model (named as in `models/`). **Good:** decreasing curves. With few labels, a classifier loss that falls to almost zero means the classifier has memorised its few training latents; the validation accuracy above shows whether it still generalises.

# %%
names = [model_name("latent_classifier", f, draw=d0) for f in fractions]
if "classifier_free" in needed:
    names.append(model_name("denoiser_classifier_free", f0, draw=d0))
logs = {n: training_log(cfg, n) for n in names}
fig = plots.loss_curves(logs, title="Latent classifier and classifier-free denoiser training loss")
plots.save(fig, cfg, "guidance_loss")

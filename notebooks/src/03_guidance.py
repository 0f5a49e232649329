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
# Guidance steers the unconditional model towards a tissue class. For each label fraction, a latent classifier learns to recognise the class from *noised* latents z_t at random noise levels t, conditioned on t (noise-aware; the authors' release trained it on clean latents only and queried it at every t). With `latent_classifier.backbone: pretrained_unet` (the default study) the classifier is the frozen encoder half of the pre-trained denoiser with a small trained head: features learned without labels on the whole pool make it far more accurate from a few labels than one trained from scratch (`scratch`, guided-diffusion's EncoderUNet shape). During sampling its gradient pushes each denoising step towards the requested class. With `latent_classifier.pseudo_label_threshold` > 0 it also learns from the unlabeled target training images that the draw's real-only classifier labels with at least that confidence: the same unlabeled images and pseudo-labels the rival `pseudo_label` uses (the downstream classifier of `histodiffusion` never sees them; the combined arm `histodiffusion+pseudo_label` does). For the classifier-free-guidance baseline (`classifier_free`), a class-conditional denoiser is trained on the labeled fraction, with the label dropped at random (`diffusion.classifier_free_label_dropout`).

# %% tags=["parameters"]
# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []

# %%
from hdlib.evaluation import plots
from hdlib.io import atomic_write_csv
from hdlib.paths import StudyPaths, model_name
from hdlib.stages.common import setup_notebook
from hdlib.stages.guidance import accuracy_by_t, latent_classifier_selection
from hdlib.study import train
from hdlib.study.context import write_metrics
from hdlib.study.decisions import record
from hdlib.study.grid_cells import run_downstream_grid
from hdlib.study.latents import training_log
from hdlib.study.primary import fix_primary_cell
from hdlib.study.splits import draws_for, first_draw, grid_fractions, smallest_fraction

cfg = setup_notebook(params_file, overrides)  # prints where results go and the device
paths = StudyPaths(cfg)

# %% [markdown]
# ## The primary cell, fixed before any generation
#
# The study's headline comparison is made at one label count, chosen here by the rule in the params file (`downstream.primary_cell_gap`) from **real-only results only**: the largest label count at which the real-only classifier's mean test accuracy is at least that many points below the classifier trained on all labels. Nothing generated exists yet, so no HistoDiffusion number can move it. The primary cell gets every seed (`downstream.seeds`); the other label counts the first `downstream.sweep_seeds`.

# %%
primary, real_sweep = fix_primary_cell(cfg)
record(cfg, "primary_cell", primary)  # the one writer of this decision (hdlib.study.decisions)
atomic_write_csv(real_sweep, paths.table("real_only_sweep"))
print(f"primary cell: label fraction {primary['fraction']:g} = {primary['labels_per_class']['total']} labels per class "
      f"({primary['labels_per_class']['train']} train + {primary['labels_per_class']['val']} val); rule: {primary['rule']}"
      + ("" if primary["rule_met"] else " -- no label count met the rule"))

# %% [markdown]
# ## Figure: the rule that fixes the primary cell
#
# Real-only test accuracy (mean over the sweep's seeds, with each seed as a dot) against labels per class (training + validation), the classifier trained on all labels (solid line) and the rule's threshold (dashed). The primary cell (circled) is the largest label count below the dashed line. **Good:** a clear gap to the all-labels line at the primary cell, so a real gain is possible there.

# %%
fig = plots.primary_cell_rule(real_sweep, primary)
plots.save(fig, cfg, "primary_cell_rule")

# %% [markdown]
# ## The real-only classifier of every label draw
#
# The primary cell's remaining seeds get their real-only cells now (the other label counts have theirs from the rule above). Each real-only cell's model is also its draw's *baseline classifier*: the selective filter's judge and the source of the pseudo-labels that the rival (`pseudo_label`) and, with `latent_classifier.pseudo_label_threshold`, the latent classifier learn from. One model, trained once, seen by all three.

# %%
real_cells = run_downstream_grid(cfg, primary=primary["fraction"], training_sets=["real"])
print(f"{len(real_cells)} real-only cells ({len(real_cells.attrs['computed'])} computed now)")

# %%
fractions, f0, d0 = grid_fractions(cfg), smallest_fraction(cfg), first_draw(cfg)
needed = set(cfg.downstream.training_sets) | set(cfg.downstream.ratio_sweep_sets)
for f in fractions:  # each seed re-draws the labeled subset, so its own classifiers
    for d in draws_for(cfg, f, primary["fraction"]):
        train.launch_task(cfg, params_file, overrides, "latent_classifier", fraction=f, draw=d)
if "classifier_free" in needed:  # the classifier-free baseline, when the grid uses it
    for d in draws_for(cfg, f0, primary["fraction"]):
        train.launch_task(cfg, params_file, overrides, "denoiser_classifier_free", fraction=f0, draw=d)

# %% [markdown]
# ## Table: model selection of the latent classifiers
#
# Each latent classifier is scored on validation latents noised to fixed t during training, and the weights with the best mean accuracy over the timesteps the configured sampler visits (`sampling.method`, `sampling.num_inference_steps`; only those inside `sampling.guidance_interval` when one is set), each weighted equally, are kept: guidance acts at exactly those t, and the class is decided at large t. One row per fraction and label draw: the selected step, the timesteps it was selected on and its validation accuracies (also the mean over a fixed grid at t < 500 and over all t), and with pseudo-labels how many it learned from and how many of those were right (judged with the hidden labels, for this table only). **Good:** well above chance (1 / number of classes) on the selection timesteps.

# %%
selection = latent_classifier_selection(cfg, fractions, primary["fraction"])
atomic_write_csv(selection, paths.table("latent_classifier_selection"))
selection.round(3)

# %% [markdown]
# ## Figure: latent-classifier accuracy by noise level
#
# Validation accuracy of each fraction's latent classifier (one line per label fraction) on validation latents noised to timestep t (x axis: 0 = clean, right = almost pure noise); dashed: chance (1 / number of classes). **How to read:** guidance can only steer where the classifier is better than chance. **Good:** high accuracy at small t, falling smoothly towards chance at large t, and higher lines for larger label fractions. A line at chance everywhere means guidance will not produce the requested classes.

# %%
acc = accuracy_by_t(cfg, fractions, draw=d0)
atomic_write_csv(acc, paths.table("latent_classifier_accuracy_by_t"))
write_metrics(cfg, "03_guidance", {"primary_cell": primary, "accuracy_by_t": acc.to_dict(orient="records"),
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

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
# # 04 - Class-specific synthesis and selective filtering
#
# First the guidance scale, interval and adaptation are chosen at the primary cell on the draw's labeled validation images and the look of the target's unlabeled images (never on test). Then, for every label fraction and label draw, each generator the grid needs fills an exact per-class quota: candidates are generated in rounds and filtered with the real-only baseline classifier of that labeled subset (nearest class centroid = intended class, confidence >= `filtering.tau`, and not a near copy of a labeled image, with the near-copy distance calibrated per class on the labeled validation images), until each class has its quota or reached the cap; any shortfall is reported. Kept images are ordered by `filtering.selection` (closest to the class centroid, random, or diverse). Images are written as PNGs with a manifest, so they can be used by any training code.

# %% tags=["parameters"]
# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []

# %%
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from hdlib.evaluation import plots
from hdlib.evaluation.downstream import evaluate
from hdlib.io import atomic_write_csv
from hdlib.paths import GENERATORS, StudyPaths, percent_text, synthetic_set_name
from hdlib.stages.common import setup_notebook
from hdlib.stages.synthesis import synthesis_stage
from hdlib.study import train
from hdlib.study.classifiers import reference_classifier
from hdlib.study.context import device, write_metrics
from hdlib.study.splits import (
    first_draw,
    load_split_images,
    smallest_fraction,
    split_images,
    split_labels,
)
from hdlib.study.synthetic_sets import first_images, generators_needed, load_set

cfg = setup_notebook(params_file, overrides)  # prints where results go and the device
paths = StudyPaths(cfg)

# %% [markdown]
# ## The reference classifier (an independent judge)
#
# Trained once on *all* of the target's training labels. It never decides anything; it judges the class of generated images (the `guided_class_accuracy` below) and gives the feature space for FID / KID (06_quality). Its validation accuracy bounds how well it can judge.

# %%
ref = reference_classifier(cfg)
ref_val = evaluate(ref, split_images(cfg, "target_val"), split_labels(cfg, "target_val"),
                   num_classes=len(cfg.data.classes), class_names=list(cfg.data.classes), device=device(cfg))
print(f"reference classifier (all training labels): validation accuracy {ref_val['accuracy']:.3f}")

# %% [markdown]
# ## Choice on validation, generation and filtering

# %%
display(Markdown("Generators:\n\n" + "\n".join(f"- `{g}`: {GENERATORS[g]}"
                                                   for g in generators_needed(cfg) + ["pretrained"])))


def train_model(task, fraction, adaptation, draw):
    train.launch_task(cfg, params_file, overrides, task, fraction=fraction, adaptation=adaptation, draw=draw)


metrics = synthesis_stage(cfg, train_model=train_model)
metrics["reference_val"] = ref_val
write_metrics(cfg, "04_synthesis", metrics)
accounting = pd.DataFrame(metrics["accounting"])
f0, d0 = smallest_fraction(cfg), first_draw(cfg)
kept_acc = metrics["guided_class_accuracy"]
print(f"chosen on validation: guidance scale {metrics['guidance_scale']:g}, adaptation `{metrics['adaptation']}`; "
      f"at the primary cell the reference classifier gives {metrics['guided_class_accuracy_n']} kept images their "
      f"target class for " + ("n/a" if kept_acc is None else f"{kept_acc:.3f}") + " (balanced over classes), and "
      f"{metrics['guided_class_accuracy_candidates_n']} candidates for {metrics['guided_class_accuracy_candidates']:.3f}")

# %% [markdown]
# ## Figure: choosing the guidance scale and adaptation on validation
#
# Each point is a small HistoDiffusion sample (`sampling.sweep_per_class` per class) at the primary cell and first label draw, for one guidance scale (x axis, s = 0 is no guidance) and adaptation and guidance interval (line). Circles: the share whose nearest class centroid of the draw's *labeled validation* images is the intended class; squares: the independent reference classifier's accuracy (reported only, never used to choose). **Good:** both well above chance (dashed) at the chosen scale (dotted). The choice: among the settings within 0.05 of the best validation agreement, the one whose samples are closest (Fréchet distance in the baseline classifier's features, column `frechet_to_target` of the table) to the target's unlabeled training images.

# %%
sel = pd.DataFrame(metrics["selection_table"])
if len(sel):
    fig = plots.guidance_selection(sel, num_classes=len(cfg.data.classes), chosen=metrics["guidance_scale"])
    plots.save(fig, cfg, "guidance_sweep")
sel.round(3)

# %% [markdown] id="08a"
# ## Figure: which classes guidance gets right
#
# For the HistoDiffusion images the filter **kept** at the primary cell (every label draw there), per target class: blue, the share the independent reference classifier gives their target class (above the bar, its most frequent other call); orange, the share the latent classifier that guided them gives their target class, on the re-encoded image. A class with no kept image has no bar (the table below names it). The same on every candidate, before the filter, is in `tables/guided_class_faithfulness_candidates.csv`. **Good:** both bars high for every class. A class with a high orange bar and a low blue one is where guidance satisfied the latent classifier without producing the class's appearance: the latent classifier, trained on few labels, is the weak link there, not the sampler.

# %% id="08b"
faith = pd.DataFrame(metrics["guided_class_faithfulness"])
if faith.empty:  # the filter kept nothing at the primary cell: say so, and show the candidates instead
    print("The filter kept no HistoDiffusion image at the primary cell; the figure shows every candidate instead.")
    faith = pd.DataFrame(metrics["guided_class_faithfulness_candidates"])
    fig = plots.guided_faithfulness(faith, title="Which classes guidance gets right: every candidate (none was kept)")
else:
    fig = plots.guided_faithfulness(faith)
plots.save(fig, cfg, "guided_class_faithfulness")
faith.round(3)

# %% [markdown]
# ## Table: a faster sampler with the same guidance
#
# The chosen guidance (scale, adaptation, latent classifier) run by each sampler of `sampling.sampler_comparison` (`method:steps`; DDIM, or DPM-Solver++ 2nd-order multistep) on the same request (`sampling.sweep_per_class` per class, same seeds). Columns: validation agreement, the reference classifier's class accuracy, the Frechet distance to the validation images in the baseline classifier's features (lower is closer; biased upwards at this sample size, so compare rows, not studies) and seconds per image. **Good:** DPM-Solver++ in few steps matches DDIM's accuracy and distance at a fraction of its time (then `sampling.method: dpm_solver` is worth it).

# %%
comparison = pd.DataFrame(metrics["sampler_comparison"])
comparison.round(3) if len(comparison) else Markdown("(not run: `sampling.sampler_comparison` is empty)")

# %% [markdown]
# ## Table: requested vs achieved synthetic images
#
# Per generator, fraction and label draw: the images requested (the largest synthetic-to-real ratio used at that fraction x each class's real count), the images kept, the candidates generated, the shortfall (classes that hit the cap `sampling.max_candidates_factor` x quota) and the near copies found. **Good:** no shortfall; a shortfall means the downstream cells of that setting received fewer synthetic images than their ratio says (the grid table reports the achieved counts).

# %%
summary = accounting.groupby(["generator", "fraction", "draw"])[["requested", "achieved", "candidates",
                                                                "shortfall", "near_copies"]].sum()
summary["kept share"] = (summary["achieved"] / summary["candidates"]).round(3)
atomic_write_csv(summary.reset_index(), paths.table("synthesis_accounting_summary"))
summary

# %% [markdown]
# ## Figure: real and generated images per class (smallest label fraction, first draw)
#
# Rows are tissue classes; column groups are image sets, three images each: real target training images (`real`), HistoDiffusion images kept by filtering, best ranked first (`histodiffusion`), the same generator's first candidates before filtering (`histodiffusion_unfiltered`), the ablation generators' kept images, and the unguided pre-trained model (`pretrained`: its class is only the request). **How to read:** go along a row and ask whether each generated tile would be called that tissue class. **Good:** `histodiffusion` tiles show the class's morphology in the stain and texture of the real column.

# %%
labels = split_labels(cfg, "target_train").numpy()
rows = np.concatenate([np.flatnonzero(labels == k)[:3] for k in range(len(cfg.data.classes))])
sets = {"real": load_split_images(cfg, "target_train", rows)}


for g, kept, label in [("histodiffusion", True, "histodiffusion"), ("histodiffusion", False, "histodiffusion_unfiltered"),
                       ("scratch", True, "scratch"), ("classifier_free", True, "classifier_free"),
                       ("pretrained", False, "pretrained")]:
    name = synthetic_set_name(g, f0, d0)
    if (paths.synthetic(name) / "manifest.csv").exists():
        sets[label] = first_images(cfg, load_set(cfg, name), kept, n=3)
fig = plots.comparison_grid(sets, cfg.data.classes, n=3, title=f"Real and generated images per class, {percent_text(f0)} labels")
plots.save(fig, cfg, "synthesis_comparison_grid")

# %% [markdown]
# ## Figure: filtering outcome per class (histodiffusion, smallest label fraction, first draw)
#
# Each bar holds all candidates generated for one class, split by outcome: kept, over quota (accepted but not needed), or rejected because the nearest real class centroid was another class (`wrong_centroid`), because the baseline classifier's confidence was below `filtering.tau` (`low_confidence`), or because it is a near copy of a labeled image (`near_copy`). **Good:** mostly kept or over quota in every class; many near copies mean the generator reproduces the few labeled images.

# %%
hd = load_set(cfg, synthetic_set_name("histodiffusion", f0, d0))
outcome = hd.pivot_table(index="class_name", columns="decision", values="index", aggfunc="count",
                         fill_value=0).reindex(cfg.data.classes, fill_value=0).reset_index()
fig = plots.filtering_outcomes(outcome, title=f"Filtering outcome per class, histodiffusion, {percent_text(f0)} labels")
plots.save(fig, cfg, "filtering_acceptance")
outcome

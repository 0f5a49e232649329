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
# # 05 - Downstream classification across label fractions
#
# Trains the downstream tissue classifier (timm, from scratch, flips / 90-degree rotations / colour jitter) on each cell of the grid: label fraction x training set x synthetic-to-real ratio x seed. Model selection uses the validation split only; the test set is evaluated once per cell. Each cell carries a content key of its inputs: finished cells are reused, and a cell whose inputs changed (e.g. a re-generated synthetic set) is recomputed.

# %% tags=["parameters"]
# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []

# %%
import pandas as pd
from IPython.display import Markdown, display

from hdlib.evaluation import plots
from hdlib.evaluation.stats import grid_summary
from hdlib.io import atomic_write_csv
from hdlib.paths import TRAINING_SETS, StudyPaths, percent_text
from hdlib.stages.common import setup_notebook
from hdlib.stages.downstream import (
    HEADLINE_COMPARISONS,
    gain_table,
    power_plan,
    primary_result,
    shifted_cohort_result,
)
from hdlib.study.context import write_metrics
from hdlib.study.decisions import primary_cell
from hdlib.study.grid_cells import run_downstream_grid
from hdlib.study.splits import first_draw

cfg = setup_notebook(params_file, overrides)  # prints where results go and the device
paths = StudyPaths(cfg)

# %%
display(Markdown("Training sets in this grid (each adds its synthetic images to the same real labeled "
                 "images):\n\n" + "\n".join(f"- `{s}`: {TRAINING_SETS[s]}" for s in cfg.downstream.training_sets)))
primary = primary_cell(cfg)  # fixed in stage 03 from real-only results (hdlib.study.decisions)
results = run_downstream_grid(cfg, primary["fraction"])
computed, stale = results.attrs["computed"], results.attrs["stale_recomputed"]
n_cells = results["id"].nunique()
print(f"{n_cells} grid cells: {n_cells - len(computed)} reused from an earlier run, "
      f"{len(computed) - len(stale)} computed for the first time, {len(stale)} recomputed because an input changed")
atomic_write_csv(results.drop(columns=[c for c in results.columns if "confusion" in c or c == "study_dir"]),
                 paths.table("downstream_grid_raw"))

# %% [markdown]
# ## Table: test accuracy per training set and label fraction
#
# Main grid (`downstream.ratio` synthetic images per real one, 0 for `real`): mean, standard deviation and 95% confidence interval (Student t) over the seeds; `n` is the number of seeds. Balanced accuracy and macro-F1 are written to `tables/` and the report.

# %%
main = results[results["ratio"].isin([0.0, cfg.downstream.ratio]) & results["fraction"].isin(cfg.downstream.fractions)]
tables = {}
for metric in ["test.accuracy", "test.balanced_accuracy", "test.macro_f1"]:
    tables[metric] = grid_summary(main, metric)
    short = metric.split(".")[1]
    atomic_write_csv(tables[metric][0], paths.table(f"downstream_{short}"))
    atomic_write_csv(tables[metric][1], paths.table(f"downstream_{short}_vs_real"))
summary, comps = tables["test.accuracy"]
summary.round(4)

# %% [markdown]
# ## Figure: test accuracy vs label fraction
#
# One line per training set: mean test accuracy over seeds against the labeled fraction (log scale); the shaded band is the 95% confidence interval. **Good (the paper's claim):** `histodiffusion` above `real`, with the largest gap at the smallest fractions and the gap closing as labels become plentiful; `histodiffusion` above `histodiffusion_unfiltered` shows the value of filtering, above `scratch` the value of pre-training on unlabeled data.

# %%
fig = plots.accuracy_vs_fraction(summary, "test accuracy")
plots.save(fig, cfg, "downstream_accuracy_vs_fraction")

# %% [markdown]
# ## Table: paired comparison against real-only
#
# For each setting, the accuracy difference to `real` trained on the same labeled images with the same seed (`mean_diff`, in accuracy units: 0.02 = 2 points), its 95% CI, the paired t-test p-value and the Wilcoxon signed-rank p-value (NaN with fewer than 6 seeds). **How to read:** a CI entirely above 0 is a reliable gain, entirely below 0 a reliable loss; a CI containing 0 is inconclusive with this many seeds.

# %%
comps.round(4)

# %% [markdown]
# ## The headline: the primary cell
#
# At the label count fixed in stage 03 by the params file's rule (before any HistoDiffusion run): HistoDiffusion minus real-only and minus the pseudo-label rival (which adds the same unlabeled target images, pseudo-labeled by the real-only classifier, without generation), paired over every seed, and the minimum detectable difference (MDD) at 80% power of this design. **How to read:** a gain is established only where its 95% CI lies above 0; an observed difference below the MDD cannot be told from noise.

# %%
headline = primary_result(cfg, results, primary)
lpc = primary["labels_per_class"]
rows = [{"comparison": name, **{k: v for k, v in (headline[key] or {}).items()}}
        for key, name in (("vs_real", "HistoDiffusion - real-only"), ("vs_rival", "HistoDiffusion - pseudo-label rival"),
                          ("combined_vs_rival", "HistoDiffusion + pseudo-labels - pseudo-label rival"))]
display(Markdown(f"Primary cell: {lpc['total']} labels per class ({lpc['train']} train + {lpc['val']} validation), "
                 f"{headline['n_seeds']} seeds. Rule: {primary['rule']}."))
pd.DataFrame(rows).round(4)

# %% [markdown]
# ### Power: what a smaller detectable difference would cost
#
# The paired spread of HistoDiffusion - real-only at the primary cell sets how many seeds a target MDD needs; the primary cell's grid time at that many seeds is projected from this run's mean cell time (cells run `study.workers` at a time). **How to read:** a target whose grid time alone exceeds the study's 45 minutes of stages does not fit this design at this cost per cell.

# %%
power = power_plan(cfg, results, primary, headline)
pd.DataFrame(power["targets"]).assign(seeds_now=power["n_seeds"], mdd_now=power["mdd_points"],
                                      mean_cell_s=power["primary_cell_mean_s"]).round(2)

# %% [markdown]
# ## Figure: gain against labels per class
#
# HistoDiffusion's test-accuracy difference (points) to real-only and to the pseudo-label rival at every label count, paired over seeds, with 95% CIs; the dotted line marks the primary cell; with a shifted test cohort, the right panel shows the same comparisons on it. The table below gives Holm-corrected p-values across label counts. **Good (the paper's claim):** both lines above 0 where labels are scarce, closing towards 0 as labels become plentiful.

# %%
gains = gain_table(cfg, results, primary["labels_per_class_by_fraction"])
atomic_write_csv(gains, paths.table("downstream_gain_vs_labels"))
shifted = shifted_cohort_result(cfg, results, primary)  # the secondary endpoint; None without a shifted cohort
if len(gains):
    panels = gains if shifted is None else pd.concat(  # one panel per test cohort
        [gains.assign(cohort="main"), pd.DataFrame(shifted["gain_vs_labels"]).assign(cohort="shifted")])
    fig = plots.gain_vs_labels(panels, primary_labels=lpc["total"])
    plots.save(fig, cfg, "downstream_gain_vs_labels")
gains.round(4)

# %% [markdown]
# ## The shifted test cohort (secondary endpoint)
#
# Every classifier of the grid scored once more, on test images in a look never seen in the pool or in training (the demo's `data.demo.shifted_test_style`; a real study's `data.shifted_test_path`), as CRC-VAL-HE-7K is to NCT-CRC-HE-100K. The same pre-declared comparisons at the primary cell, Holm-corrected across the three. **How to read:** synthetic data is reported to help most under such a shift; a gain here that is absent on the main cohort would be that effect.

# %%
if shifted is not None:
    atomic_write_csv(pd.DataFrame(shifted["accuracy"]), paths.table("downstream_accuracy_shifted"))
    atomic_write_csv(pd.DataFrame(shifted["gain_vs_labels"]), paths.table("downstream_gain_vs_labels_shifted"))
    display(pd.DataFrame([{"comparison": k, **(shifted[k] or {})} for k in HEADLINE_COMPARISONS]).round(4))
else:
    print("no shifted test cohort in this study (data.demo.shifted_test_style / data.shifted_test_path)")

# %% [markdown]
# ## Figure: how many synthetic images to add
#
# Test accuracy at the ratio-sweep label fraction against the number of synthetic images added, as a percentage of the real labeled images (100% doubles the training set); mean and 95% CI over seeds. The grey line and band are real-only. **Good:** accuracy rises above the grey band and levels off; a drop at high ratios means synthetic images start to drown the real signal.

# %%
ratio_summary = ratio_comps = pd.DataFrame()
sweep = results[(results["fraction"] == cfg.downstream.ratio_sweep_fraction)
                & results["training_set"].isin(list(cfg.downstream.ratio_sweep_sets) + ["real"])]
if cfg.downstream.ratio_sweep:  # the ratio sweep lives in params/ablations.yaml
    ratio_summary, ratio_comps = grid_summary(sweep, "test.accuracy")
    atomic_write_csv(ratio_summary, paths.table("downstream_ratio_sweep"))
    atomic_write_csv(ratio_comps, paths.table("downstream_ratio_sweep_vs_real"))
    fig = plots.ratio_sweep(ratio_summary, "test accuracy",
                            title=f"Synthetic-to-real ratio at {percent_text(cfg.downstream.ratio_sweep_fraction)} labels")
    plots.save(fig, cfg, "downstream_ratio_sweep")
ratio_summary.round(4)

# %% [markdown]
# ## Figures: confusion matrices at the primary cell (first seed)
#
# Rows are the true class, columns the predicted class; each row sums to 1, so the diagonal is each class's recall. One matrix for `real` and one for `histodiffusion`. **Good:** a strong diagonal. Comparing the two shows which classes the synthetic images help (diagonal up) and which they confuse (off-diagonal up), e.g. pairs that are also hard for pathologists such as stroma vs muscle or debris vs mucus.

# %%
f0 = primary["fraction"]
picks = results[(results["fraction"] == f0) & (results["seed"] == first_draw(cfg))
                & results["training_set"].isin(["real", "histodiffusion"])
                & results["ratio"].isin([0.0, cfg.downstream.ratio])]
for _, r in picks.iterrows():
    fig = plots.confusion(r["test.confusion_matrix"], cfg.data.classes,
                          title=f"{r['training_set']}, {percent_text(f0)} labels, seed {r['seed']}")
    plots.save(fig, cfg, f"downstream_confusion_{r['training_set']}")

# %%
write_metrics(cfg, "05_downstream", {
    "accuracy": tables["test.accuracy"][0].to_dict(orient="records"),
    "accuracy_vs_real": tables["test.accuracy"][1].to_dict(orient="records"),
    "balanced_accuracy": tables["test.balanced_accuracy"][0].to_dict(orient="records"),
    "labels_per_class": primary["labels_per_class_by_fraction"],
    "macro_f1": tables["test.macro_f1"][0].to_dict(orient="records"),
    "ratio_sweep": ratio_summary.to_dict(orient="records"),
    "ratio_sweep_vs_real": ratio_comps.to_dict(orient="records"),
    "cells": int(n_cells), "cells_computed": len(computed), "cells_stale_recomputed": len(stale),
    # the headline at the primary cell (stage 03's rule): primary_cell, vs_real, vs_rival, n_seeds, mdd_points
    **headline,
    "gain_vs_labels": gains.to_dict(orient="records"),
    **({"shifted_cohort": shifted} if shifted is not None else {}),
    "power": power})

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
# # 00 - Data
#
# Builds (or scans) the study's data: the labeled target (train / validation / test), nested label-fraction subsets that simulate scarce annotation, and the unlabeled pre-training pool, which never contains a target image (checked by file hash). Writes manifests with file hashes to `manifests/` so the study can be re-run on exactly the same images. The manifests are the index every later stage streams images from (no stage holds a whole dataset in memory). Nothing is trained here.

# %% tags=["parameters"]
# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []

# %%
import numpy as np
import pandas as pd

from hdlib.evaluation import plots
from hdlib.io import atomic_write_csv
from hdlib.paths import StudyPaths, percent_text
from hdlib.stages.common import setup_notebook
from hdlib.study.preparation import prepare_data
from hdlib.study.splits import load_split_images, split_labels, split_sources

cfg = setup_notebook(params_file, overrides)  # prints where results go and the device
paths = StudyPaths(cfg)

# %%
summary = prepare_data(cfg)
skipped = {split: n for split, n in summary["unreadable"].items() if n}
print("unreadable images skipped:", skipped or "none")

# %% [markdown]
# ## Table: labeled target, images per class and split
#
# Rows are tissue classes, columns the splits. The validation split is held out of the training images (stratified by class, seeded) and only used to select models; the test split is used once, for the final evaluation. **Good:** every class is present in every split, and validation and test have a class balance similar to training.

# %%
counts = pd.DataFrame(summary["counts"])
counts.loc["total"] = counts.sum()
atomic_write_csv(counts.reset_index(names="class"), paths.table("data_counts"))
counts

# %% [markdown]
# ## Table: label-fraction subsets
#
# The study keeps the labels of only a fraction of the training images. Columns are label fractions, cells the number of labeled images per class (first label draw; every downstream seed re-draws the subset with the same sizes). Subsets are nested (every image labeled at the smallest fraction is also labeled at the larger ones) and stratified, so class proportions are preserved. **Check:** every class has at least one labeled image at the smallest fraction; with only a handful per class, results at that fraction vary a lot between seeds.

# %%
fractions = pd.DataFrame(summary["fractions"])
fractions.columns = [percent_text(c) for c in fractions.columns]
fractions.loc["total"] = fractions.sum()
atomic_write_csv(fractions.reset_index(names="class"), paths.table("data_fractions"))
fractions

# %% [markdown]
# ## Table: unlabeled pre-training pool per source
#
# Per source: tiles drawn into the pool, tiles the source offered, and tiles held out to test the autoencoder on images it never trained on. The generative model learns histology from these tiles only, never from the labeled target.

# %%
pool_table = pd.DataFrame({"tiles in pool": summary["pool"], "available": summary["pool_available"],
                           "held out (autoencoder test)": summary["pool_holdout"]})
atomic_write_csv(pool_table.reset_index(names="source"), paths.table("data_pool"))
pool_table

# %% [markdown]
# ## Figure: labeled target images per class
#
# Each row is one tissue class (row label) with ten of its training images. **How to read:** images in a row should share the tissue pattern of their class and differ from the other rows; this is what the generator has to reproduce per class. **Look out for** mislabeled tiles, empty tiles outside the background class, or strong stain differences within a class.

# %%
labels = split_labels(cfg, "target_train").numpy()
rows = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(len(cfg.data.classes))])
images, image_labels = load_split_images(cfg, "target_train", rows)
fig = plots.per_class_rows(images, image_labels, cfg.data.classes, n=10,
                           title="Labeled target: training images per class")
plots.save(fig, cfg, "data_target_per_class")

# %% [markdown]
# ## Figure: unlabeled pool, tiles per source
#
# Each row is one source of the unlabeled pool: the images the autoencoder and the unconditional diffusion model learn from. **Good:** tissue-rich tiles with varied morphology. Stain or scanner differences from the target are expected (the study asks whether pre-training on other data helps); tiles that are mostly glass, pen marks or out of focus mean the tissue filter (`data.tissue_threshold`) is too lax.

# %%
sources = np.array(split_sources(cfg, "pool"))
rows = {name: load_split_images(cfg, "pool", np.flatnonzero(sources == name)[:10])[0] for name in dict.fromkeys(sources)}
fig = plots.image_rows(rows, n=10, title="Unlabeled pre-training pool: tiles per source")
plots.save(fig, cfg, "data_pool_per_source")

# %% [markdown]
# ## Figure: labeled images per class at each label fraction
#
# Bars give the number of labeled training images per class (log scale), one colour per label fraction. **Good:** each colour keeps the same relative bar heights across classes (stratified sampling) and no class drops to zero.

# %%
frac_long = (pd.DataFrame(summary["fractions"]).reset_index(names="class")
             .melt(id_vars="class", var_name="fraction", value_name="images"))
frac_long["fraction"] = frac_long["fraction"].astype(float).map(percent_text)
fig = plots.bar(frac_long, x="class", y="images", hue="fraction", log_y=True, ylabel="labeled images (log scale)",
                title="Labeled training images per class and label fraction")
plots.save(fig, cfg, "data_fractions")

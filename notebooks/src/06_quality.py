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
# # 06 - Generation quality
#
# FID and KID (torchmetrics), overall and per class, and precision / recall of each synthetic set at the smallest label fraction, against the real test set. Features come from the reference classifier trained once on all the target's training labels (no Inception weights are downloadable here; give `quality.inception_weights` a local file to add Inception FID), so the values compare the sets of this study with each other, not with FID values published for Inception features.

# %% tags=["parameters"]
# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []

# %%
import numpy as np
import pandas as pd

from hdlib.evaluation import plots
from hdlib.evaluation.downstream import extract_features
from hdlib.io import atomic_write_csv
from hdlib.paths import StudyPaths
from hdlib.stages.common import setup_notebook
from hdlib.stages.quality import (
    nearest_training_examples,
    quality_sets,
    quality_table,
    shared_class_sets,
)
from hdlib.study.classifiers import reference_classifier
from hdlib.study.context import device, write_metrics
from hdlib.study.splits import split_images, split_labels
from hdlib.study.synthetic_sets import set_images

cfg = setup_notebook(params_file, overrides)  # prints where results go and the device
paths = StudyPaths(cfg)

# %%
ref = reference_classifier(cfg)


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
atomic_write_csv(per_class, paths.table("quality_per_class"))

# %% [markdown]
# ## Table: overall generation quality
#
# Each row is an image set compared with the real test set: `real (val)` (real images: the floor a perfect generator would reach with this many images; with few images its KID scatters around 0 and can be negative, which `kid_resolved` = false marks as indistinguishable from 0), the filtered sets the downstream classifier is trained on (`histodiffusion`, `scratch`, `classifier_free`), the same candidates before filtering (`*_unfiltered`) and unguided samples (`pretrained`). FID and KID measure how far the generated images' feature distribution is from the real one (lower is better; KID is less biased for small sets, `kid_std` is its spread over random subsets). Precision is the share of generated images that fall within the range of real ones (realism), recall the share of real images whose neighbourhood contains generated ones (diversity); both 0 to 1, higher is better. **Good:** `histodiffusion` closer to `real (val)` than the other generators, with high precision and recall.

# %%
overall.round(4)

# %% [markdown]
# ## Figure: FID per image set
#
# Overall FID of each set from the table above (lower is better; `real (val)` is the floor). **Good:** `histodiffusion` the lowest generated set, ideally close to `real (val)`.

# %%
if "fid" in overall:
    fig = plots.bar(overall.dropna(subset=["fid"]), x="set", y="fid", ylabel="FID (lower is better)",
                    title="FID to the real test set (reference-classifier features)")
    plots.save(fig, cfg, "quality_fid")
else:
    print("too few images for FID")

# %% [markdown]
# ## Figure: KID per image set
#
# Overall KID of each set (mean over random subsets; the error bar is its std over the subsets). Lower is better; sets whose error bars overlap are not clearly different.

# %%
if "kid_mean" in overall:
    fig = plots.bar(overall.dropna(subset=["kid_mean"]), x="set", y="kid_mean", err="kid_std",
                    ylabel="KID (lower is better)", title="KID to the real test set (mean and std over subsets)")
    plots.save(fig, cfg, "quality_kid")

# %% [markdown]
# ## Table: FID per class
#
# FID between the generated images of one class (columns: image sets) and the real test images of the same class (rows). Per-class sets are small, which biases FID upwards: compare the sets within a row rather than absolute values. **Good:** `histodiffusion` low in every class; a class where every generator is high is one the models have not learned to draw.

# %%
per_class.pivot(index="class", columns="set", values="fid").round(3) if len(per_class) else per_class

# %% [markdown]
# ## Table: every set on the classes they all hold, the filtered ones included
#
# A filtered set that kept no image of some class is left out of the tables above (they need every class). Here every set is compared on the classes each of them holds at least 2 images of, cut to the same images per class, against the real test images of those classes; `real (val)` again gives the floor. The classes each set lacks are listed below the table. **Good:** `histodiffusion` close to `real (val)`, and no class missing.

# %%
shared_sets, shared_n, shared_classes, lacking = shared_class_sets(cfg)
if shared_sets:
    shared_val_rows = np.concatenate([np.flatnonzero(val_labels == k)[:shared_n] for k in shared_classes])
    shared_sets = {"real (val)": pd.read_csv(paths.manifest("target_val"), keep_default_na=False).iloc[shared_val_rows]
                   } | shared_sets
    overall_shared, _ = quality_table(cfg, shared_sets, features, classes=shared_classes)
    atomic_write_csv(overall_shared, paths.table("quality_overall_shared_classes"))
    print(f"on {len(shared_classes)} classes ({', '.join(cfg.data.classes[k] for k in shared_classes)}), "
          f"{shared_n} images per class; classes a set lacks: "
          + ("; ".join(f"{k}: {', '.join(v)}" for k, v in lacking.items() if v) or "none"))
else:
    overall_shared = pd.DataFrame()
    print("no class that every set holds 2 images of")
overall_shared.round(4)

# %% [markdown]
# ## Figure: FID per class
#
# The table above as bars: for each class, one bar per image set. **How to read:** within each class, the shortest bar is the set closest to the real images of that class.

# %%
if len(per_class):
    fig = plots.bar(per_class, x="class", y="fid", hue="set", ylabel="FID (lower is better)",
                    title="FID per class to the real test images")
    plots.save(fig, cfg, "quality_fid_per_class")
else:
    print("too few images per class for per-class metrics")

# %% [markdown]
# ## Figure: KID per class
#
# KID (mean over random subsets) per class and image set, read like the FID figure above; KID is less biased than FID for the small per-class sets, so it is the better of the two for comparing classes with each other.

# %%
if len(per_class):
    fig = plots.bar(per_class, x="class", y="kid_mean", hue="set", ylabel="KID (lower is better)",
                    title="KID per class to the real test images")
    plots.save(fig, cfg, "quality_kid_per_class")
else:
    print("too few images per class for per-class metrics")

# %% [markdown]
# ## Inception FID (only with a local weights file)
#
# The FID usually reported in papers, for the filtered `histodiffusion` set.

# %%
inception = None
if cfg.quality.inception_weights and "histodiffusion" in sets:
    from hdlib.data.streaming import load_into_memory
    from hdlib.evaluation.metrics import inception_fid

    real_test = load_into_memory(split_images(cfg, "target_test"))[0]
    inception = inception_fid(real_test, load_into_memory(set_images(cfg, sets["histodiffusion"]))[0],
                              cfg.quality.inception_weights, device=device(cfg))
    print("Inception FID (histodiffusion):", inception)
else:
    print("Inception FID skipped (quality.inception_weights is empty, or no histodiffusion set)")
write_metrics(cfg, "06_quality", {"overall": overall.to_dict(orient="records"),
                                  "per_class": per_class.to_dict(orient="records"),
                                  "images_per_class": int(per_class_n), "inception_fid": inception,
                                  # every set (the filtered ones too) on the classes they all hold
                                  "overall_shared_classes": overall_shared.to_dict(orient="records"),
                                  "shared_classes": [cfg.data.classes[k] for k in shared_classes],
                                  "shared_images_per_class": int(shared_n),
                                  "classes_lacking": {k: v for k, v in lacking.items() if v}})

# %% [markdown]
# ## Figure: memorisation check: the closest samples and their nearest labeled image
#
# For each generator, pairs of rows: the candidates closest (in the baseline classifier's feature space) to one of the labeled training images, and below each, that training image. **How to read:** near-identical pairs are copies, not new images; the filter drops candidates closer than the per-class threshold calibrated on real images (the near-copy rate per generator is in 04_synthesis). **Good:** the pairs share the class but differ in layout, cells and texture. Generators trained only on the few labeled images (`scratch`, `classifier_free`) are the usual offenders.

# %%
pairs = nearest_training_examples(cfg, n=8)
if pairs:
    fig = plots.image_rows(pairs, n=8, title="Closest synthetic samples (odd rows) and their nearest labeled image")
    plots.save(fig, cfg, "quality_nearest_training")
else:
    print("no filtered set with near-copy distances")

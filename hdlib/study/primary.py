"""The primary (headline) cell, fixed before any generation by a rule over real-only
results: real-only downstream cells at every label count (the sweep's draws) and the
classifier trained on all labels, judged by `hdlib.stats.primary_cell`."""

from __future__ import annotations

import pandas as pd

from ..config import Config
from ..downstream import evaluate
from ..stats import primary_cell
from .classifiers import reference_classifier
from .context import device
from .grid_cells import run_downstream_grid
from .splits import labels_per_class, split_images, split_labels


def fix_primary_cell(cfg: Config) -> tuple[dict, pd.DataFrame]:
    """(the primary cell record, the real-only sweep's results). Reads no synthetic or
    pseudo-labeled result: only real-only cells exist when it runs."""
    sweep = run_downstream_grid(cfg, primary=None, training_sets=["real"])
    names = list(cfg.data.classes)
    ref = evaluate(reference_classifier(cfg), split_images(cfg, "target_test"), split_labels(cfg, "target_test"),
                   num_classes=len(names), class_names=names, device=device(cfg))
    cell = primary_cell(sweep, ref["accuracy"], cfg.downstream.primary_cell_gap, key="fraction")
    first = cfg.downstream.seeds[0]
    cell["labels_per_class"] = labels_per_class(cfg, cell["fraction"], first)
    cell["labels_per_class_by_fraction"] = {f"{f:g}": labels_per_class(cfg, f, first) for f in cfg.downstream.fractions}
    cell["real_only_seeds"] = int(sweep.groupby("fraction")["seed"].nunique().min())
    return cell, sweep

"""The primary (headline) cell, fixed before any generation by a rule over real-only
results: real-only downstream cells at every label count (the sweep's draws) and the
classifier trained on all labels, judged by `hdlib.evaluation.stats.primary_cell`."""

from __future__ import annotations

import pandas as pd

from ..config import Config
from ..evaluation.stats import primary_cell, rule_margin
from .classifiers import reference_classifier
from .grid_cells import run_downstream_grid, test_scores
from .splits import first_draw, has_shifted_cohort, labels_per_class


def fix_primary_cell(cfg: Config) -> tuple[dict, pd.DataFrame]:
    """(the primary cell record, the real-only sweep's results). Reads no synthetic or
    pseudo-labeled result: only real-only cells exist when it runs."""
    sweep = run_downstream_grid(cfg, primary=None, training_sets=["real"])
    reference = reference_classifier(cfg)
    ref = test_scores(cfg, reference)
    gap, frozen = cfg.downstream.primary_cell_gap, cfg.downstream.primary_cell_frozen
    cell = primary_cell(sweep, ref["accuracy"], gap, key="fraction")
    cell["rule_fraction"] = cell["fraction"]
    if frozen.fraction:  # decided once; this run recomputes the rule and says whether it still agrees
        cell.update({"fraction": float(frozen.fraction), "frozen_at": frozen.frozen_at,
                     "frozen_from": {"real_only_mean": frozen.real_only_mean,
                                     "all_labels_accuracy": frozen.all_labels_accuracy,
                                     "real_only_seeds": frozen.real_only_seeds},
                     "real_only_mean": cell["real_only_means"][float(frozen.fraction)]})
    cell["rule_agrees"] = cell["rule_fraction"] == cell["fraction"]
    cell["rule_margin"] = rule_margin(sweep, cell["fraction"], ref["accuracy"], gap)
    first = first_draw(cfg)
    cell["labels_per_class"] = labels_per_class(cfg, cell["fraction"], first)
    cell["labels_per_class_by_fraction"] = {f"{f:g}": labels_per_class(cfg, f, first) for f in cfg.downstream.fractions}
    cell["real_only_seeds"] = int(sweep.groupby("fraction")["seed"].nunique().min())
    if has_shifted_cohort(cfg):  # the all-labels ceiling on the secondary endpoint (never used by the rule)
        cell["all_labels_accuracy_shifted"] = test_scores(cfg, reference, "target_test_shifted")["accuracy"]
    return cell, sweep

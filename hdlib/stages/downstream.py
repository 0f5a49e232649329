"""Stage 05: the downstream grid's answers. The grid itself (cells, content keys, workers)
is `hdlib.study.grid_cells`; here its results become the paired comparisons of
HistoDiffusion against real-only and against the rival that uses the same unlabeled
images, at every label count (Holm-corrected across label counts) and at the primary cell
fixed in stage 03 (with the minimum detectable difference at 80% power)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import Config
from ..evaluation.stats import (
    grid_summary,
    holm_adjust,
    min_detectable_difference,
    paired_comparison,
    seeds_for_mdd,
)

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "study.mixed_precision", "data.classes", "data.image_size",
               "data.labeled_val_every", "downstream"],
    "files": ["synthetic/", "grid/", "metrics/03_guidance.json", "metrics/04_synthesis.json"],
}


METHOD = "histodiffusion"
RIVALS = {"real": "vs real-only", "pseudo_label": "vs pseudo-label rival"}
COMBINED = "histodiffusion+pseudo_label"
# the headline's pre-declared comparisons: (arm, against); combined - rival is what generation adds to self-training
HEADLINE_COMPARISONS = {"vs_real": (METHOD, "real"), "vs_rival": (METHOD, "pseudo_label"),
                        "combined_vs_rival": (COMBINED, "pseudo_label")}


def _paired(results: pd.DataFrame, fraction: float, a: str, b: str, ratio: float,
            metric: str = "test.accuracy") -> tuple[np.ndarray, np.ndarray] | None:
    """Values of training sets a and b at one fraction, matched by seed (None if either is absent)."""
    def arm(name):
        r = 0.0 if name == "real" else ratio
        g = results[(results["fraction"] == fraction) & (results["training_set"] == name) & (results["ratio"] == r)]
        return g.set_index("seed")[metric]
    x, y = arm(a), arm(b)
    seeds = sorted(set(x.index) & set(y.index))
    if len(seeds) < 2:
        return None
    return x.loc[seeds].to_numpy(), y.loc[seeds].to_numpy()


def gain_table(cfg: Config, results: pd.DataFrame, labels_per_class: dict, metric: str = "test.accuracy") -> pd.DataFrame:
    """One row per (comparison, label fraction): HistoDiffusion minus the other arm, paired
    over seeds, with a Holm-adjusted t-test p-value within each comparison across fractions."""
    rows = []
    for other, comp in RIVALS.items():
        if other not in cfg.downstream.training_sets or METHOD not in cfg.downstream.training_sets:
            continue
        for f in cfg.downstream.fractions:
            pair = _paired(results, f, METHOD, other, cfg.downstream.ratio, metric)
            if pair is None:
                continue
            c = paired_comparison(*pair)
            rows.append({"comparison": comp, "against": other, "fraction": f,
                         "labels_per_class": labels_per_class[f"{f:g}"]["total"], **c})
    table = pd.DataFrame(rows)
    if not table.empty:
        table["holm_pvalue"] = np.nan
        for comp, idx in table.groupby("comparison").groups.items():
            table.loc[idx, "holm_pvalue"] = holm_adjust(table.loc[idx, "t_pvalue"].to_numpy())
    return table


def primary_result(cfg: Config, results: pd.DataFrame, primary: dict, metric: str = "test.accuracy") -> dict:
    """The headline: at the primary cell, HistoDiffusion against real-only and against the
    rival (paired differences, accuracy as a fraction of 1), the number of seeds, and the
    minimum detectable difference at 80% power (points) from the paired spread vs real-only."""
    f = primary["fraction"]
    out = {"primary_cell": {k: primary[k] for k in ("fraction", "labels_per_class", "rule", "rule_met",
                                                     "real_only_mean", "all_labels_accuracy", "gap")}}
    out["primary_cell"].update({k: primary.get(k) for k in ("frozen_at", "frozen_from", "rule_fraction", "rule_agrees",
                                                            "rule_margin")})
    # the rule read real-only over stage 03's sweep seeds; the headline's own real-only figure is over its seeds
    out["primary_cell"]["rule_seeds"] = primary.get("real_only_seeds")
    real = results[(results["fraction"] == f) & (results["training_set"] == "real")][metric]
    out["real_only_at_primary"] = {"mean": float(real.mean()), "n": int(len(real))} if len(real) else None
    for key, (arm, other) in HEADLINE_COMPARISONS.items():
        pair = _paired(results, f, arm, other, cfg.downstream.ratio, metric)
        if pair is None:
            out[key] = None
            continue
        c = paired_comparison(*pair)
        sd = float(np.std(pair[0] - pair[1], ddof=1))
        out[key] = {k: c[k] for k in ("mean_diff", "ci_low", "ci_high", "t_pvalue", "n")}
        out[key]["mdd_points"] = 100 * min_detectable_difference(sd, c["n"])
    # the pre-declared comparisons at the primary cell, Holm-corrected across each other
    ran = [k for k in HEADLINE_COMPARISONS if out.get(k)]
    for k, p in zip(ran, holm_adjust([out[k]["t_pvalue"] for k in ran])):
        out[k]["p_holm"] = float(p)
    out["n_seeds"] = int(out["vs_real"]["n"]) if out.get("vs_real") else 0
    out["mdd_points"] = out["vs_real"]["mdd_points"] if out.get("vs_real") else float("nan")
    out["verdict"] = headline_verdict(out.get("vs_real"), out.get("vs_rival"))
    return out


ALPHA = 0.05


def headline_verdict(vs_real: dict | None, vs_rival: dict | None) -> str:
    """The headline's verdict code. A difference counts only when its paired 95% CI excludes zero AND its
    Holm-corrected p across the pre-declared comparisons is below ALPHA: with 3 seeds the uncorrected CI
    of the ablations' vs_real once lay above zero at Holm p 0.062, and the report said 'beats'."""
    def holds(c, sign):
        return bool(c) and (c["ci_low"] > 0 if sign > 0 else c["ci_high"] < 0) and c.get("p_holm", c["t_pvalue"]) < ALPHA

    if holds(vs_real, +1):
        return "beats_both" if holds(vs_rival, +1) else "beats_real_only"
    if holds(vs_real, -1):
        return "worse_than_real_only"
    if vs_real and (vs_real["ci_low"] > 0 or vs_real["ci_high"] < 0):
        return "not_significant_after_holm"
    return "no_detectable_gain"


# power: the MDD the issue asks for at the primary cell (points; aim, then bound), inside 45 minutes of stages
POWER_TARGETS_POINTS = (1.5, 2.0)
STAGE_BUDGET_S = 45 * 60


def power_plan(cfg: Config, results: pd.DataFrame, primary: dict, headline: dict) -> dict:
    """What a target MDD at the primary cell would cost, from this run: the paired spread of HistoDiffusion -
    real-only, the seeds each target needs, and the primary cell's grid time at that many seeds from the
    measured mean time of its cells (run `study.workers` at a time). Timing-derived keys end in _s."""
    f, ratio = primary["fraction"], cfg.downstream.ratio
    pair = _paired(results, f, METHOD, "real", ratio)
    at = results[(results["fraction"] == f) & results["ratio"].isin([0.0, ratio])]
    arms, cell_s, workers = int(at["training_set"].nunique()), float(at["elapsed_s"].mean()), max(1, cfg.study.workers)
    sd = float(np.std(pair[0] - pair[1], ddof=1)) if pair is not None else float("nan")
    out = {"paired_sd_points": 100 * sd, "n_seeds": headline.get("n_seeds"), "mdd_points": headline.get("mdd_points"),
           "arms_at_primary": arms, "workers": workers, "primary_cell_mean_s": cell_s,
           "stage_budget_s": STAGE_BUDGET_S, "targets": []}
    for target in POWER_TARGETS_POINTS:
        n = seeds_for_mdd(sd, target / 100)
        grid_s = None if n is None else n * arms * cell_s / workers
        out["targets"].append({"mdd_points": target, "seeds": n, "primary_cell_grid_s": grid_s,
                               "fits_stage_budget": None if grid_s is None else bool(grid_s <= STAGE_BUDGET_S)})
    return out


SHIFTED_METRIC = "test_shifted.accuracy"


def shifted_cohort_result(cfg: Config, results: pd.DataFrame, primary: dict) -> dict | None:
    """The secondary endpoint: every arm's accuracy on the shifted test cohort (another look, never in the pool
    nor in training), the pre-declared comparisons at the primary cell on it (Holm across the three) and the
    gain by label count. None when the study has no shifted cohort."""
    if SHIFTED_METRIC not in results.columns:
        return None
    main = results[results["ratio"].isin([0.0, cfg.downstream.ratio]) & results["fraction"].isin(cfg.downstream.fractions)]
    at_primary = primary_result(cfg, results, primary, metric=SHIFTED_METRIC)
    return {"split": "target_test_shifted", "metric": "accuracy",
            "all_labels_accuracy": primary.get("all_labels_accuracy_shifted"),
            "accuracy": grid_summary(main, SHIFTED_METRIC)[0].to_dict(orient="records"),
            **{k: at_primary[k] for k in ("real_only_at_primary", *HEADLINE_COMPARISONS, "n_seeds", "mdd_points")},
            "gain_vs_labels": gain_table(cfg, results, primary["labels_per_class_by_fraction"],
                                         metric=SHIFTED_METRIC).to_dict(orient="records")}

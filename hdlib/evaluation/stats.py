"""Statistics over seeds: mean, std and t-interval per setting, and paired
comparisons (same fraction, same seed) of each setting against real-only."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def _values(values, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"{name}: no values")
    return v


def summarize(values, confidence: float = 0.95) -> dict:
    """Mean, sample std and a Student-t confidence interval for the mean (NaN CI for n=1)."""
    from scipy import stats

    v = _values(values, "summarize")
    n = int(v.size)
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": n}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * std / math.sqrt(n))
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def paired_comparison(a, b, confidence: float = 0.95) -> dict:
    """Paired comparison of a against b (same seeds, same order): mean of a - b with a
    t-interval, paired t-test p-value and Wilcoxon signed-rank p-value (NaN for n < 6,
    where even the most extreme ranks cannot reach p < 0.05); both p-values are NaN when
    all differences are equal."""
    from scipy import stats

    a, b = _values(a, "paired_comparison a"), _values(b, "paired_comparison b")
    if a.shape != b.shape:
        raise ValueError(f"paired_comparison: a and b have different lengths ({a.size} vs {b.size})")
    diff = a - b
    s = summarize(diff, confidence)
    n = s["n"]
    constant = bool(np.all(diff == diff[0]))
    # Equal differences have zero spread: the t statistic is undefined, say so with NaN.
    t_p = float(stats.ttest_rel(a, b).pvalue) if n >= 2 and not constant else float("nan")
    w_p = float("nan")
    if n >= 6 and not constant:
        w_p = float(stats.wilcoxon(a, b).pvalue)
    return {"mean_diff": s["mean"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
            "t_pvalue": t_p, "wilcoxon_pvalue": w_p, "n": n}


def grid_summary(results: pd.DataFrame, metric: str = "test.accuracy",
                 keys=("fraction", "training_set", "ratio")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean, std and 95% CI per setting, and a paired comparison (same fraction and
    seed) of each augmented setting against real-only."""
    keys = list(keys)
    rows = [{**dict(zip(keys, key)), **summarize(g[metric].to_numpy())}
            for key, g in results.groupby(keys, sort=True)]
    comps = []
    real = results[results["training_set"] == "real"]
    for key, g in results[results["training_set"] != "real"].groupby(keys, sort=True):
        base = real[real["fraction"] == key[0]].set_index("seed")[metric]
        mine = g.set_index("seed")[metric]
        common = sorted(set(base.index) & set(mine.index))
        if common:
            comps.append({**dict(zip(keys, key)),
                          **paired_comparison(mine.loc[common].to_numpy(), base.loc[common].to_numpy())})
    return pd.DataFrame(rows), pd.DataFrame(comps)


PRIMARY_CELL_RULE = ("the largest label count at which real-only mean test accuracy is at least {gap:g} points below "
                     "the classifier trained on all labels (if none is, the smallest label count)")


def primary_cell(results: pd.DataFrame, all_labels_accuracy: float, gap: float, key: str = "fraction",
                 metric: str = "test.accuracy") -> dict:
    """The study's headline cell, fixed by a rule that reads real-only results only: the
    largest `key` (label fraction, or labels per class) whose real-only mean `metric` is at
    least `gap` (a fraction of 1) below `all_labels_accuracy`. Rows of every other training
    set are ignored, so no HistoDiffusion number can move it."""
    real = results[results["training_set"] == "real"]
    if real.empty:
        raise ValueError("primary_cell: no real-only results to apply the rule to")
    means = real.groupby(key)[metric].mean().sort_index()
    below = means[means <= all_labels_accuracy - gap]
    met = not below.empty
    cell = below.index.max() if met else means.index.min()
    return {key: float(cell), "rule": PRIMARY_CELL_RULE.format(gap=100 * gap),
            "rule_met": met, "real_only_mean": float(means[cell]), "all_labels_accuracy": float(all_labels_accuracy),
            "gap": float(gap), "real_only_means": {float(k): float(v) for k, v in means.items()}}


def rule_margin(results: pd.DataFrame, cell, all_labels_accuracy: float, gap: float, key: str = "fraction",
                metric: str = "test.accuracy") -> dict:
    """How far the rule's condition holds at a cell: (all-labels accuracy - real-only mean) - gap, with
    the standard error of the real-only mean over its seeds (positive = the cell qualifies)."""
    real = results[(results["training_set"] == "real") & (results[key] == cell)][metric]
    n = int(len(real))
    se = float(real.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"margin": float(all_labels_accuracy - real.mean() - gap), "se": se, "n_seeds": n}


def min_detectable_difference(paired_sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean paired difference a two-sided paired t-test at level `alpha`
    detects with probability `power`, for n pairs with sample sd `paired_sd` (normal-shift
    approximation with t quantiles on n - 1 degrees of freedom)."""
    from scipy import stats

    if n < 2 or not np.isfinite(paired_sd):
        return float("nan")
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * paired_sd / math.sqrt(n))


def seeds_for_mdd(paired_sd: float, target: float, alpha: float = 0.05, power: float = 0.8,
                  max_n: int = 10_000) -> int | None:
    """The fewest pairs whose minimum detectable difference (`min_detectable_difference`) is at most
    `target` for this paired spread; None when not even max_n pairs reach it (or the spread is unknown)."""
    if not np.isfinite(paired_sd):
        return None
    if paired_sd == 0:
        return 2
    for n in range(2, max_n + 1):
        if min_detectable_difference(paired_sd, n, alpha, power) <= target:
            return n
    return None


def holm_adjust(pvalues) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out

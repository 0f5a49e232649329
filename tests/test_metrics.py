"""hdlib.metrics against hand-computed values and direct scipy/numpy computations."""

import math

import numpy as np
import pytest
import torch
from scipy import linalg, stats

from hdlib.errors import DataError, HDLibError
from hdlib.evaluation.metrics import (
    classification_metrics,
    fid_kid,
    frechet_distance,
    inception_fid,
    precision_recall,
)
from hdlib.evaluation.stats import paired_comparison, summarize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gaussian(n, d, seed, shift=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(size=(n, d)) * scale + shift


# --- Frechet distance -------------------------------------------------------

def test_frechet_identical_sets_is_zero():
    f = gaussian(200, 8, 0)
    assert abs(frechet_distance(f, f)) < 1e-6


def test_frechet_matches_the_closed_form_from_the_sample_statistics():
    a, b = gaussian(300, 6, 1), gaussian(200, 6, 2, shift=0.3, scale=1.5)
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_of_a_shifted_copy_is_the_squared_shift():
    f, shift = gaussian(100, 4, 0), np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_distance(f, f + shift) == pytest.approx(float(shift @ shift), abs=1e-6)


def test_frechet_singular_covariances_stay_finite_and_bad_input_is_one_line():
    # 3 samples in 10 dimensions: rank-deficient covariances
    assert math.isfinite(frechet_distance(gaussian(3, 10, 2), gaussian(3, 10, 3)))
    with pytest.raises(DataError, match="feature sizes differ"):
        frechet_distance(gaussian(5, 3, 0), gaussian(5, 4, 0))
    with pytest.raises(DataError, match="at least 2 samples"):
        frechet_distance(gaussian(1, 3, 0), gaussian(5, 3, 0))


def test_fid_kid_identical_and_shifted():
    real = gaussian(200, 5, 7)
    same = fid_kid(real, real, kid_subset_size=100, kid_subsets=10)
    assert abs(same["fid"]) < 1e-6
    # Unbiased KID of one set against itself is zero up to subset noise (a few kid_std).
    assert abs(same["kid_mean"]) < 4 * same["kid_std"] + 1e-9
    assert abs(same["kid_mean"]) < 0.1
    shifted = fid_kid(real, real + 0.5, kid_subset_size=100, kid_subsets=10)
    assert shifted["fid"] == pytest.approx(0.25 * 5, rel=1e-6)
    assert shifted["kid_mean"] > 4 * shifted["kid_std"]
    assert shifted["kid_mean"] > 10 * abs(same["kid_mean"])


def test_kid_deterministic_for_seed_and_leaves_global_rng_alone():
    real, fake = gaussian(120, 4, 8), gaussian(120, 4, 9, shift=0.5)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = fid_kid(real, fake, kid_subset_size=30, kid_subsets=8, seed=3)
    after = torch.rand(1)
    b = fid_kid(real, fake, kid_subset_size=30, kid_subsets=8, seed=3)
    c = fid_kid(real, fake, kid_subset_size=30, kid_subsets=8, seed=4)
    assert torch.equal(before, after)  # our call did not advance the caller's RNG
    assert a == b
    assert a["kid_mean"] != c["kid_mean"]


def test_fid_kid_errors_name_the_problem():
    with pytest.raises(DataError, match="feature sizes differ"):
        fid_kid(gaussian(10, 3, 0), gaussian(10, 4, 1))
    with pytest.raises(DataError, match="kid_subset_size"):
        fid_kid(gaussian(10, 3, 0), gaussian(10, 3, 1), kid_subset_size=20)


# --- precision / recall -----------------------------------------------------

def test_precision_recall_identical_sets_are_one():
    f = gaussian(100, 4, 10)
    assert precision_recall(f, f, k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_mode_collapse_kills_recall_not_precision():
    real = gaussian(200, 3, 11)
    fake = np.repeat(real.mean(0, keepdims=True), 50, axis=0)  # every sample is the same point
    pr = precision_recall(real, fake, k=3, chunk_size=37)
    assert pr["precision"] == 1.0  # the mean lies inside the real manifold
    assert pr["recall"] < 0.02


def test_precision_recall_disjoint_sets_are_zero():
    real = gaussian(80, 3, 12)
    pr = precision_recall(real, real + 100.0, k=3)
    assert pr == {"precision": 0.0, "recall": 0.0}


# --- Inception FID ----------------------------------------------------------

def test_inception_fid_never_downloads(tmp_path):
    imgs = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(HDLibError, match="local Inception weights"):
        inception_fid(imgs, imgs, None)
    with pytest.raises(DataError, match="not found"):
        inception_fid(imgs, imgs, tmp_path / "missing.pth")


# --- classification metrics -------------------------------------------------

def test_classification_metrics_hand_computed_three_classes():
    # Confusion matrix (rows true, cols pred):
    #   [[2, 1, 0],
    #    [0, 3, 1],
    #    [1, 0, 2]]
    y_true = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 1, 1, 2, 2, 2, 0]
    m = classification_metrics(torch.tensor(y_true), torch.tensor(y_pred), 3, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 3, 1], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    sens = [2 / 3, 3 / 4, 2 / 3]
    spec = [6 / 7, 5 / 6, 6 / 7]  # TN / (TN + FP) per class
    assert m["balanced_accuracy"] == pytest.approx(np.mean(sens))
    assert [m["sensitivity"][c] for c in "abc"] == pytest.approx(sens)
    assert [m["specificity"][c] for c in "abc"] == pytest.approx(spec)
    prec = [2 / 3, 3 / 4, 2 / 3]
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, sens)]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["support"] == {"a": 3, "b": 4, "c": 3}


def test_classification_metrics_absent_class_does_not_crash():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 2], num_classes=4)
    assert math.isnan(m["sensitivity"]["2"]) and math.isnan(m["sensitivity"]["3"])
    assert m["specificity"]["3"] == 1.0
    assert m["specificity"]["2"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # over classes present in y_true
    assert m["sensitivity"]["0"] == 0.5 and m["sensitivity"]["1"] == 0.5
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]
    assert math.isfinite(m["macro_f1"])


def test_classification_metrics_bad_input():
    with pytest.raises(DataError, match="same non-zero length"):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(DataError, match="outside"):
        classification_metrics([0, 5], [0, 1], 2)
    with pytest.raises(DataError, match="class_names"):
        classification_metrics([0, 1], [0, 1], 2, ["only-one"])


# --- statistics over seeds --------------------------------------------------

def test_summarize_matches_scipy_t_interval():
    v = [0.81, 0.84, 0.79, 0.86, 0.83]
    s = summarize(v, confidence=0.9)
    lo, hi = stats.t.interval(0.9, df=4, loc=np.mean(v), scale=stats.sem(v))
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(np.mean(v))
    assert s["std"] == pytest.approx(np.std(v, ddof=1))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((lo, hi))


def test_summarize_single_value_gives_nan_ci():
    s = summarize([0.7])
    assert s["mean"] == 0.7 and s["n"] == 1
    assert math.isnan(s["ci_low"]) and math.isnan(s["ci_high"]) and math.isnan(s["std"])
    with pytest.raises(ValueError):
        summarize([])


def test_paired_comparison_sign_and_pvalues():
    base = np.array([0.70, 0.72, 0.68, 0.71, 0.69, 0.73, 0.70, 0.71])
    better = base + np.array([0.05, 0.04, 0.06, 0.05, 0.03, 0.05, 0.04, 0.06])
    up = paired_comparison(better, base)
    assert up["n"] == 8
    assert up["mean_diff"] == pytest.approx(0.0475)
    assert 0 < up["ci_low"] < up["mean_diff"] < up["ci_high"]
    assert up["t_pvalue"] < 0.001
    assert up["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon(better, base).pvalue)
    assert up["wilcoxon_pvalue"] < 0.05
    down = paired_comparison(base, better)
    assert down["mean_diff"] < 0 and down["ci_high"] < 0
    assert down["t_pvalue"] == pytest.approx(up["t_pvalue"])
    noise = paired_comparison(base, base[::-1])
    assert noise["t_pvalue"] > 0.3


def test_paired_comparison_small_or_constant():
    few = paired_comparison([1.0, 2.0, 3.5], [0.5, 1.0, 3.0])
    assert few["n"] == 3 and math.isnan(few["wilcoxon_pvalue"]) and math.isfinite(few["t_pvalue"])
    const = paired_comparison([1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6])
    assert const["mean_diff"] == 1.0
    assert math.isnan(const["wilcoxon_pvalue"]) and math.isnan(const["t_pvalue"])
    with pytest.raises(ValueError, match="different lengths"):
        paired_comparison([1, 2], [1, 2, 3])

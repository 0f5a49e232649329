"""The headline cell is fixed by a rule over real-only results: no other training set moves it."""

from pathlib import Path

import pandas as pd
import pytest

from hdlib.config import load_config
from hdlib.evaluation.stats import primary_cell


def _grid(real_means, hd_means, seeds=3):
    rows = []
    for f, m in real_means.items():
        for s in range(seeds):
            rows.append({"training_set": "real", "fraction": f, "seed": s, "test.accuracy": m + 0.01 * (s - 1)})
    for f, m in hd_means.items():
        for s in range(seeds):
            rows.append({"training_set": "histodiffusion", "fraction": f, "seed": s, "test.accuracy": m})
    return pd.DataFrame(rows)


def test_largest_label_count_at_least_gap_below_all_labels():
    grid = _grid({0.02: 0.60, 0.05: 0.80, 0.25: 0.92}, {})
    cell = primary_cell(grid, all_labels_accuracy=0.99, gap=0.10)
    assert cell["fraction"] == 0.05 and cell["rule_met"]
    assert cell["real_only_mean"] == pytest.approx(0.80)
    assert "10 points" in cell["rule"]


def test_reads_only_real_only_results():
    real = {0.02: 0.60, 0.05: 0.80, 0.25: 0.92}
    a = primary_cell(_grid(real, {0.02: 0.1, 0.05: 0.1, 0.25: 0.1}), 0.99, 0.10)
    b = primary_cell(_grid(real, {0.02: 0.99, 0.05: 0.99, 0.25: 0.99}), 0.99, 0.10)
    assert a == b


def test_no_cell_below_the_gap_takes_the_smallest_and_says_so():
    cell = primary_cell(_grid({0.05: 0.95, 0.25: 0.97}, {}), all_labels_accuracy=0.99, gap=0.10)
    assert cell["fraction"] == 0.05 and not cell["rule_met"]


def test_without_real_only_results_it_refuses():
    with pytest.raises(ValueError, match="real-only"):
        primary_cell(_grid({}, {0.05: 0.9}), 0.99, 0.10)


def test_min_detectable_difference_matches_a_simulated_power():
    import numpy as np
    from scipy import stats as st

    from hdlib.evaluation.stats import min_detectable_difference

    sd, n = 0.012, 10
    mdd = min_detectable_difference(sd, n)
    rng = np.random.default_rng(0)
    d = rng.normal(mdd, sd, size=(4000, n))
    power = np.mean(st.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05)
    assert 0.75 < power < 0.85
    assert min_detectable_difference(sd, 40) < mdd


def test_holm_adjusts_step_down_and_keeps_nan():
    import numpy as np

    from hdlib.evaluation.stats import holm_adjust

    adj = holm_adjust([0.01, 0.04, float("nan"), 0.03])
    assert np.allclose(adj[[0, 1, 3]], [0.03, 0.06, 0.06]) and np.isnan(adj[2])


def _arms(gains, seeds=10):
    """Grid results: real-only, histodiffusion = real + gain, rival = real + 0 per seed, at two fractions."""
    import numpy as np

    rng = np.random.default_rng(1)
    rows = []
    for f, gain in gains.items():
        for s in range(seeds):
            base = 0.8 + rng.normal(0, 0.01)
            for ts, ratio, acc in (("real", 0.0, base), ("histodiffusion", 1.0, base + gain),
                                   ("pseudo_label", 1.0, base + 0.5 * gain)):
                rows.append({"fraction": f, "training_set": ts, "ratio": ratio, "seed": s,
                             "test.accuracy": acc + rng.normal(0, 0.002)})
    return pd.DataFrame(rows)


def _cfg():
    return load_config(Path(__file__).resolve().parent.parent / "params" / "default.yaml",
                       ["downstream.fractions=[0.05, 0.2]", "data.label_fractions=[0.05, 0.2]",
                        "downstream.primary_cell_frozen.fraction=0"])


def test_primary_result_reports_both_comparisons_mdd_and_a_computed_verdict():
    from hdlib.stages.downstream import primary_result

    results = _arms({0.05: 0.03, 0.2: 0.0})
    primary = {"fraction": 0.05, "labels_per_class": {"train": 6, "val": 2, "total": 8}, "rule": "r",
               "rule_met": True, "real_only_mean": 0.8, "all_labels_accuracy": 0.99, "gap": 0.1}
    out = primary_result(_cfg(), results, primary)
    assert out["n_seeds"] == 10 and out["primary_cell"]["fraction"] == 0.05
    assert out["vs_real"]["mean_diff"] == pytest.approx(0.03, abs=0.003)
    assert out["vs_rival"]["mean_diff"] == pytest.approx(0.015, abs=0.003)
    assert 0 < out["mdd_points"] < 1.0  # paired sd ~0.3 points, 10 seeds
    assert out["verdict"] == "beats_both"
    none = primary_result(_cfg(), results, {**primary, "fraction": 0.2})
    assert none["verdict"] == "no_detectable_gain"


def test_gain_table_is_holm_corrected_within_each_comparison():
    from hdlib.stages.downstream import gain_table

    table = gain_table(_cfg(), _arms({0.05: 0.03, 0.2: 0.0}), {"0.05": {"total": 8}, "0.2": {"total": 32}})
    assert set(table["comparison"]) == {"vs real-only", "vs pseudo-label rival"}
    assert (table["holm_pvalue"] >= table["t_pvalue"]).all()
    assert sorted(table["labels_per_class"].unique()) == [8, 32]


def test_report_names_the_links_that_miss_their_aims():
    import pandas as pd

    from hdlib.stages.report import broken_links

    d4 = {"guided_class_accuracy": 0.59, "guided_class_accuracy_on": "kept",
          "guided_class_accuracy_per_class": {"ADI": 0.32, "BACK": 0.92, "STR": 0.30}}
    acc = pd.DataFrame({"achieved": [100, 80], "requested": [135, 135]})
    text = broken_links(d4, {"mdd_points": 3.1}, acc)
    assert text.startswith("Where the chain breaks: kept images are of their target class for 0.59")
    # a metrics file that measured candidates says nothing about kept images
    old = broken_links({k: v for k, v in d4.items() if k != "guided_class_accuracy_on"}, {"mdd_points": 1.0})
    assert "target class" not in old
    assert "below 0.6 for STR 0.30, ADI 0.32" in text and "BACK" not in text
    assert "kept 180 of 270 requested images" in text and "differences of 3.1 points" in text
    good = {"guided_class_accuracy": 0.9, "guided_class_accuracy_on": "kept",
            "guided_class_accuracy_per_class": {"ADI": 0.8, "STR": 0.95}}
    assert broken_links(good, {"mdd_points": 1.2}, pd.DataFrame({"achieved": [5], "requested": [5]})).startswith(
        "Every measured link meets its aim")


def test_fractions_print_with_their_digits():
    from hdlib.paths import percent_text

    assert [percent_text(f) for f in (0.025, 0.0125, 0.05, 0.1, 1.0)] == ["2.5%", "1.25%", "5%", "10%", "100%"]


def test_near_copy_rates_are_those_of_the_rows_given():
    import pandas as pd

    from hdlib.stages.synthesis import near_copy_rates

    acct = pd.DataFrame({"generator": ["histodiffusion"] * 3 + ["scratch"], "fraction": [0.025, 0.025, 0.05, 0.025],
                         "near_copies": [30, 10, 0, 1], "candidates": [50, 50, 100, 10]})
    assert near_copy_rates(acct) == {"histodiffusion": 0.2, "scratch": 0.1}  # pooled over label counts
    assert near_copy_rates(acct[acct["fraction"] == 0.025]) == {"histodiffusion": 0.4, "scratch": 0.1}


def _sweep(means_by_fraction, seeds=3):
    import pandas as pd

    rows = [{"training_set": "real", "fraction": f, "seed": s, "test.accuracy": m + 0.01 * (s - 1)}
            for f, m in means_by_fraction.items() for s in range(seeds)]
    return pd.DataFrame(rows)


def test_a_frozen_cell_never_moves_and_the_rule_reports_its_margin(monkeypatch):
    """The rule now picks 0.05 (real-only 0.80, 0.19 below 0.99) but the cell was frozen at 0.025:
    the cell stays, the record says the rule disagrees, with the margin at the frozen cell and its
    standard error over seeds."""
    from hdlib.study import primary

    monkeypatch.setattr(primary, "run_downstream_grid", lambda cfg, primary, training_sets: _sweep(
        {0.025: 0.77, 0.05: 0.80, 0.1: 0.95}))
    monkeypatch.setattr(primary, "reference_classifier", lambda cfg: None)
    monkeypatch.setattr(primary, "test_scores", lambda *a, **k: {"accuracy": 0.99})
    monkeypatch.setattr(primary, "has_shifted_cohort", lambda cfg: False)
    monkeypatch.setattr(primary, "labels_per_class", lambda cfg, f, d: {"total": int(f * 160)})
    frozen = load_config("params/default.yaml")
    cell, _ = primary.fix_primary_cell(frozen)
    assert cell["fraction"] == 0.025 and cell["rule_fraction"] == 0.05 and cell["rule_agrees"] is False
    assert cell["frozen_at"] == "4e9f45c" and cell["frozen_from"]["real_only_mean"] == 0.773
    m = cell["rule_margin"]
    assert abs(m["margin"] - (0.99 - 0.77 - 0.10)) < 1e-9 and m["n_seeds"] == 3 and abs(m["se"] - 0.01 / 3 ** 0.5) < 1e-9
    assert abs(cell["real_only_mean"] - 0.77) < 1e-9  # this run's real-only figure at the frozen cell
    free = load_config("params/default.yaml", ["downstream.primary_cell_frozen.fraction=0"])
    cell, _ = primary.fix_primary_cell(free)
    assert cell["fraction"] == 0.05 and cell["rule_agrees"] is True and "frozen_at" not in cell


def test_a_frozen_cell_must_be_a_grid_fraction():
    import pytest

    from hdlib.errors import ConfigError

    with pytest.raises(ConfigError, match="primary_cell_frozen.fraction: 0.3 is not in downstream.fractions"):
        load_config("params/default.yaml", ["downstream.primary_cell_frozen.fraction=0.3"])


def test_the_combined_arm_adds_the_rivals_images_and_the_kept_synthetic_ones(monkeypatch):
    """histodiffusion+pseudo_label: the rival's pseudo-labeled images (predicted labels of unlabeled
    training images, never a test label) followed by HistoDiffusion's best-ranked kept images."""
    import pandas as pd
    import torch

    from hdlib.paths import training_set_generator
    from hdlib.study import synthetic_sets as ss

    class Items(torch.utils.data.Dataset):
        def __init__(self, n, tag):
            self.n, self.tag = n, tag

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return torch.full((3, 4, 4), self.tag, dtype=torch.uint8), -1

    monkeypatch.setattr(ss, "pseudo_label_images", lambda cfg, f, r, d: (Items(2, 7), torch.tensor([1, 0]), "pl"))
    syn = pd.DataFrame({"label": [0, 0, 1, 1], "kept": [True, True, True, False], "rank": [1, 0, 0, -1],
                        "index": [0, 1, 0, 1], "path": ["a", "b", "c", "d"]})
    monkeypatch.setattr(ss, "load_set", lambda cfg, name: syn)
    monkeypatch.setattr(ss, "fraction_labels", lambda cfg, f, d: torch.tensor([0, 1]))
    monkeypatch.setattr(ss, "set_content_key", lambda cfg, name: "hd")
    monkeypatch.setattr(ss, "set_images", lambda cfg, frame: Items(len(frame), 9))
    cfg = load_config("params/smoke.yaml")
    x, y, key = ss.added_training_images(cfg, "histodiffusion+pseudo_label", 0.25, 1.0, 0)
    assert len(x) == 4 and y.tolist() == [1, 0, 0, 1]  # the rival's two, then one kept image per class
    assert [int(x[i][0][0, 0, 0]) for i in range(4)] == [7, 7, 9, 9] and key
    assert training_set_generator("histodiffusion+pseudo_label") == "histodiffusion"


def test_the_verdict_needs_the_holm_corrected_p_as_well_as_the_ci():
    """The ablations' regenerated run: HistoDiffusion - real-only +3.5 points, 95% CI [0.8, 6.3] (3 seeds), Holm
    p 0.062 across the pre-declared comparisons. The CI alone said 'beats real-only'; corrected, it is not a
    reliable difference, and the sentence says why. Every code has a sentence in the report."""
    from hdlib.stages.downstream import headline_verdict
    from hdlib.stages.report import VERDICTS

    def c(lo, hi, p_holm):
        return {"ci_low": lo, "ci_high": hi, "t_pvalue": p_holm / 2, "p_holm": p_holm}

    rival = c(-0.25, 0.006, 0.062)
    assert headline_verdict(c(0.008, 0.063, 0.062), rival) == "not_significant_after_holm"
    assert headline_verdict(c(0.017, 0.055, 0.006), rival) == "beats_real_only"  # the default study's
    assert headline_verdict(c(0.017, 0.055, 0.006), c(0.01, 0.02, 0.01)) == "beats_both"
    assert headline_verdict(c(0.017, 0.055, 0.006), c(0.01, 0.02, 0.07)) == "beats_real_only"
    assert headline_verdict(c(-0.05, -0.01, 0.01), rival) == "worse_than_real_only"
    assert headline_verdict(c(-0.05, -0.01, 0.2), rival) == "not_significant_after_holm"
    assert headline_verdict(c(-0.01, 0.05, 0.3), rival) == "no_detectable_gain"
    assert headline_verdict(None, None) == "no_detectable_gain"
    codes = {"beats_both", "beats_real_only", "worse_than_real_only", "not_significant_after_holm", "no_detectable_gain"}
    assert set(VERDICTS) == codes
    assert "Holm" in VERDICTS["not_significant_after_holm"] and "excludes zero" in VERDICTS["not_significant_after_holm"]

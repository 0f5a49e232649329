"""The headline cell is fixed by a rule over real-only results: no other training set moves it."""

from pathlib import Path

import pandas as pd
import pytest

from hdlib.config import load_config
from hdlib.stats import primary_cell


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


def test_the_rule_lives_in_the_default_params():
    assert load_config(Path(__file__).resolve().parent.parent / "params" / "default.yaml").downstream.primary_cell_gap == pytest.approx(0.10)

"""The shifted test cohort (issue 24's secondary endpoint): test images in a held-out look, built beside the
main data so that no existing image moves; stage 00 writes its manifest, every grid cell is scored on it, and
stage 05 reports the pre-declared comparisons on it."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hdlib import demo as D
from hdlib.config import load_config
from hdlib.errors import ConfigError
from hdlib.evaluation import plots
from hdlib.paths import StudyPaths
from hdlib.stages.downstream import HEADLINE_COMPARISONS, SHIFTED_METRIC, shifted_cohort_result
from hdlib.study.preparation import demo_root, prepare_data
from hdlib.study.splits import has_shifted_cohort, split_labels

from test_stage_data import _cfg, dataset  # noqa: F401  (the class-folder fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # set per test, never at import: a count set
# while collecting would hold for every later module (the smoke study's bit-for-bit check among them)


def test_the_demo_cohort_is_another_look_of_the_same_classes_and_rebuilds_identically(tmp_path):
    kw = dict(style="aged", image_size=24, n_per_class=2, difficulty=0.5, seed=3, progress=False)
    folder = D.build_demo_cohort(tmp_path / "cohort", **kw)
    files = sorted(folder.rglob("*.png"))
    assert len(files) == 2 * len(D.CRC_CLASSES) and {p.parent.name for p in files} == set(D.CRC_CLASSES)
    first = {p.name: p.read_bytes() for p in files}
    (tmp_path / "cohort" / "demo_data.json").unlink()  # not intact: rebuilt, byte for byte
    again = D.build_demo_cohort(tmp_path / "cohort", **kw)
    assert {p.name: p.read_bytes() for p in sorted(again.rglob("*.png"))} == first
    # the same index in the target's own look is other pixels: another stain, other tissue
    target = D.render_tile("ADI", 24, D.tile_rng(3, "test", 0, 0, "target"), "target", 0.5)
    shifted = np.asarray(Image.open(folder / "ADI" / "ADI_00000.png"))
    assert not np.array_equal(target, shifted)
    with pytest.raises(ConfigError, match="unknown stain style 'sepia'"):
        D.build_demo_cohort(tmp_path / "x", **{**kw, "style": "sepia"})


def test_a_shifted_cohort_leaves_the_main_demo_folder_where_it_was():
    with_cohort = load_config(None, ["data.demo.shifted_test_style=aged"])
    without = load_config(None, ["data.demo.shifted_test_style="])
    assert demo_root(with_cohort) == demo_root(without)  # same key: no existing image is re-rendered or moved


@pytest.mark.parametrize("overrides, match", [
    (["data.demo.shifted_test_style=classic"], "shifted test cohort's style 'classic'"),
    (["data.demo.shifted_test_style=target"], "must differ from data.demo.target_style"),
    (["data.shifted_test_path=/somewhere"], "only for data.target class_folders"),
])
def test_a_cohort_that_is_not_held_out_fails_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_stage_00_writes_the_shifted_manifest_and_counts_it(dataset):  # noqa: F811
    cfg = _cfg(dataset, f"data.shifted_test_path={dataset / 'test'}")
    summary = prepare_data(cfg)
    assert has_shifted_cohort(cfg)
    assert summary["counts"]["test_shifted"] == {"A": 4, "B": 4, "C": 4}
    assert len(split_labels(cfg, "target_test_shifted")) == 12
    plain = _cfg(dataset)  # dropped from the params: its manifest goes too
    prepare_data(plain)
    assert not has_shifted_cohort(plain) and not StudyPaths(plain).manifest("target_test_shifted").exists()


def _results(gain_main: float, gain_shifted: float) -> pd.DataFrame:
    rows, rng = [], np.random.default_rng(0)
    for f, lpc in ((0.05, 8), (0.2, 32)):
        for seed in range(6):
            base = 0.7 + 0.01 * rng.standard_normal()
            for arm, main, shifted in (("real", 0.0, 0.0), ("histodiffusion", gain_main, gain_shifted),
                                       ("pseudo_label", 0.0, 0.0), ("histodiffusion+pseudo_label", 0.0, 0.0)):
                noise = 0.002 * rng.standard_normal()
                rows.append({"fraction": f, "training_set": arm, "ratio": 0.0 if arm == "real" else 1.0,
                             "seed": seed, "test.accuracy": base + main + noise,
                             SHIFTED_METRIC: base - 0.2 + shifted + noise})
    return pd.DataFrame(rows)


def test_stage_05_reports_the_comparisons_on_the_shifted_cohort():
    cfg = load_config(None, ["downstream.fractions=[0.05, 0.2]", "data.label_fractions=[0.05, 0.2]",
                             "downstream.ratio=1.0", "downstream.primary_cell_frozen.fraction=0", "downstream.ratio_sweep=[]",
                             "downstream.training_sets=[real, histodiffusion, pseudo_label, histodiffusion+pseudo_label]"])
    primary = {"fraction": 0.05, "labels_per_class": {"train": 6, "val": 2, "total": 8}, "rule": "r", "rule_met": True,
               "real_only_mean": 0.7, "all_labels_accuracy": 0.99, "gap": 0.1, "all_labels_accuracy_shifted": 0.8,
               "labels_per_class_by_fraction": {"0.05": {"total": 8}, "0.2": {"total": 32}}}
    out = shifted_cohort_result(cfg, _results(0.0, 0.05), primary)
    assert out["vs_real"]["mean_diff"] == pytest.approx(0.05, abs=0.005) and out["vs_real"]["ci_low"] > 0
    assert all("p_holm" in out[k] for k in HEADLINE_COMPARISONS) and out["all_labels_accuracy"] == 0.8
    assert {r["labels_per_class"] for r in out["gain_vs_labels"]} == {8, 32}
    assert shifted_cohort_result(cfg, _results(0.0, 0.05).drop(columns=[SHIFTED_METRIC]), primary) is None
    gains = pd.DataFrame(out["gain_vs_labels"])
    fig = plots.gain_vs_labels(pd.concat([gains.assign(cohort="main"), gains.assign(cohort="shifted")]))
    assert [ax.get_title() for ax in fig.axes] == ["main test cohort", "shifted test cohort"]

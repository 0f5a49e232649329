"""The adaptation-length measurement (hdlib.tools.adaptation_length): its arguments are checked before
any training, its per-length summary pools draws by their image counts, and its figure draws every length."""

import pandas as pd
import pytest

from hdlib.errors import ConfigError
from hdlib.tools import adaptation_length as al


def _rows():
    return pd.DataFrame([
        {"adaptation_steps": 300, "draw": 0, "train_seconds": 340.0, "frechet_to_target_unguided": 10.0,
         "frechet_to_target_candidates": 20.0, "kept_class_accuracy": 1.0, "kept": 3,
         "candidate_class_accuracy": 0.5, "candidates": 10},
        {"adaptation_steps": 300, "draw": 1, "train_seconds": 340.0, "frechet_to_target_unguided": 14.0,
         "frechet_to_target_candidates": 30.0, "kept_class_accuracy": 0.5, "kept": 1,
         "candidate_class_accuracy": 0.0, "candidates": 30},
        {"adaptation_steps": 0, "draw": 0, "train_seconds": 0.0, "frechet_to_target_unguided": 12.0,
         "frechet_to_target_candidates": 22.0, "kept_class_accuracy": None, "kept": 0,
         "candidate_class_accuracy": 0.25, "candidates": 8},
    ])


def _faith(accuracy, n, per_class):
    return {"accuracy": accuracy, "n": n, "classes_without_images": [c for c in ("ADI", "TUM") if c not in per_class],
            "per_class": [{"class": c, "reference_accuracy": a} for c, a in per_class.items()]}


POOLED = {0: {"kept": _faith(None, 0, {}), "candidates": _faith(0.25, 8, {"ADI": 0.25, "TUM": 0.25})},
          300: {"kept": _faith(0.75, 4, {"ADI": 1.0, "TUM": 0.5}), "candidates": _faith(0.1, 40, {"ADI": 0.2, "TUM": 0.0})}}


def test_summary_is_in_length_order_averages_distances_and_takes_the_pooled_faithfulness():
    got = al.summarize(_rows(), POOLED)
    assert [r["adaptation_steps"] for r in got] == [0, 300]
    zero, long = got
    assert zero["kept_class_accuracy"] is None and zero["kept"] == 0  # no kept image: no accuracy, not 0
    assert zero["classes_without_kept_images"] == ["ADI", "TUM"]
    assert long["kept_class_accuracy"] == 0.75 and long["kept_class_accuracy_per_class"] == {"ADI": 1.0, "TUM": 0.5}
    assert long["candidate_class_accuracy"] == 0.1 and long["candidates"] == 40 and long["kept"] == 4
    assert long["frechet_to_target_unguided"] == pytest.approx(12.0) and long["draws"] == 2
    assert long["train_seconds"] == 340.0


def test_figure_has_one_point_per_length():
    from hdlib.evaluation import plots

    fig = plots.adaptation_length(pd.DataFrame(al.summarize(_rows(), POOLED)))
    assert len(fig.axes) == 2  # rows without the reference classifier's distances: no panel for them
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "300"]
    assert all(len(line.get_xdata()) == 2 for ax in fig.axes for line in ax.get_lines())
    both = pd.DataFrame(al.summarize(_rows().assign(frechet_to_target_unguided_reference=1.0,
                                                      frechet_to_target_candidates_reference=2.0), POOLED))
    assert len(plots.adaptation_length(both).axes) == 3


def test_a_folder_that_is_no_study_fails_in_one_line_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"not a study folder \(no config.json\)"):
        al.check_request(tmp_path, [0, 300], None)
    assert list(tmp_path.iterdir()) == []


def test_the_committed_measurements_are_what_the_docs_say():
    """docs/pretrained.md's tables: per objective and length, the unguided distances' means over draws of the
    committed rows; for v4's objective, the pooled figures of its summary."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "pretrained.md").read_text().splitlines()
    for folder, label in (("objective-l1-uniform", "L1, uniform t"), ("objective-v4", "L2 on v, log-normal")):
        rows = pd.read_csv(root / "results" / "adaptation_length" / folder / "adaptation_length.csv")
        assert set(rows["adaptation_steps"]) >= {0, 300, 1000} and set(rows["draw"]) == set(range(10))
        for steps, d in rows[rows["adaptation_steps"].isin([0, 300, 1000])].groupby("adaptation_steps"):
            line = (f" | {steps:,} | {d.frechet_to_target_unguided.mean():.1f} | "
                    f"{d.frechet_to_target_unguided_reference.mean():.1f} |")
            assert any(row.startswith(f"| {label}") and row.endswith(line) for row in doc), (folder, steps)
    m = json.loads((root / "results" / "adaptation_length" / "objective-v4" / "adaptation_length.json").read_text())
    for r in m["per_length"]:
        low = min(r["kept_class_accuracy_per_class"].items(), key=lambda kv: kv[1])
        assert (f"| {r['adaptation_steps']:,} | {r['frechet_to_target_candidates']:.1f} | {r['kept']} | "
                f"{r['kept_class_accuracy']:.3f} | {low[0]} {low[1]:.2f} | {r['candidate_class_accuracy']:.3f} |") in doc
    assert m["guidance"]["interval"] == [400, 999] and m["guidance"]["scale"] == 3.0  # "scale 3 from t = 400"


def test_a_length_already_trained_is_reused_not_retrained(tmp_path):
    folder = tmp_path / "denoiser"
    assert not al._trained(folder, 300)
    (folder / "final").mkdir(parents=True)
    pd.DataFrame({"step": [10, 290], "elapsed_s": [1.0, 30.0]}).to_csv(folder / "log.csv", index=False)
    assert not al._trained(folder, 300)  # stopped before its last step: resume
    pd.DataFrame({"step": [10, 300], "elapsed_s": [1.0, 31.0]}).to_csv(folder / "log.csv", index=False)
    assert al._trained(folder, 300)

"""Every label a method touches is in its budget: validation images come out of each draw's
labeled subset (nested across label counts), never from the separate target_val split."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hdlib.config import load_config
from hdlib.data.splits import (
    labeled_validation_mask,
    nested_label_fractions,
    nested_label_order,
)
from hdlib.paths import StudyPaths
from hdlib.study import pseudo_labels
from hdlib.study.splits import (
    fraction_column,
    fraction_indices,
    labeled_val_indices,
    labels_per_class,
    order_column,
    validation_set,
)

LABELS = np.repeat(np.arange(3), 40)          # 3 classes x 40 training images
FRACTIONS = [0.05, 0.1, 0.2, 0.4]             # 2, 4, 8, 16 labels per class


def test_order_matches_the_nested_subsets():
    order = nested_label_order(LABELS, seed=7)
    for f, idx in nested_label_fractions(LABELS, FRACTIONS, seed=7).items():
        k = int(round(f * 40))
        assert set(idx) == set(np.flatnonzero(order < k))


def test_validation_inside_the_labeled_subset_and_nested():
    order = nested_label_order(LABELS, seed=3)
    subsets = nested_label_fractions(LABELS, FRACTIONS, seed=3)
    val_mask = labeled_validation_mask(order, every=4)
    previous_train, previous_val = set(), set()
    for f in FRACTIONS:
        idx = subsets[f]
        val = set(idx[val_mask[idx]])
        train = set(idx) - val
        assert val and train and val <= set(idx)
        for c in range(3):  # every class has a training and a validation image
            assert any(LABELS[i] == c for i in train) and any(LABELS[i] == c for i in val)
        assert previous_train <= train and previous_val <= val  # nested across label counts
        previous_train, previous_val = train, val
    # 2 labels per class: 1 train + 1 val; 16 per class: 12 + 4
    assert len(set(subsets[0.05][val_mask[subsets[0.05]]])) == 3
    assert len(set(subsets[0.4][val_mask[subsets[0.4]]])) == 12


def _fake_study(tmp_path, labeled_val_every=4):
    cfg = load_config(Path(__file__).resolve().parent.parent / "params" / "smoke.yaml", [f"study.results_root={tmp_path}", "downstream.seeds=[0]",
                                            "data.label_fractions=[0.05, 0.1]", "downstream.fractions=[0.05, 0.1]",
                                            "downstream.ratio_sweep=[]", "data.classes=[A, B, C]",
                                            f"data.labeled_val_every={labeled_val_every}"])
    paths = StudyPaths(cfg)
    paths.fractions_csv.parent.mkdir(parents=True, exist_ok=True)
    order = nested_label_order(LABELS, seed=11)
    frac = pd.DataFrame({"train_index": np.arange(len(LABELS))})
    for f, idx in nested_label_fractions(LABELS, [0.05, 0.1], seed=11).items():
        col = np.zeros(len(LABELS), bool)
        col[idx] = True
        frac[fraction_column(f, 0)] = col
    frac[order_column(0)] = order
    frac.to_csv(paths.fractions_csv, index=False)
    for split, labels in [("target_train", LABELS), ("target_val", np.repeat(np.arange(3), 10)),
                          ("target_test", np.repeat(np.arange(3), 10))]:
        pd.DataFrame({"path": [f"{split}/{i}.png" for i in range(len(labels))], "key": "", "label": labels,
                      "class_name": [["A", "B", "C"][k] for k in labels], "source": "target",
                      "sha1": [f"{split}{i}" for i in range(len(labels))]}).to_csv(paths.manifest(split), index=False)
    return cfg


def test_the_study_trains_and_validates_on_disjoint_parts_of_its_budget(tmp_path):
    cfg = _fake_study(tmp_path)
    train, val = fraction_indices(cfg, 0.1, 0), labeled_val_indices(cfg, 0.1, 0)
    assert len(set(train) & set(val)) == 0
    assert labels_per_class(cfg, 0.1, 0) == {"train": 3, "val": 1, "total": 4}
    assert set(fraction_indices(cfg, 0.05, 0)) <= set(train) and set(labeled_val_indices(cfg, 0.05, 0)) <= set(val)
    images, labels, _ = validation_set(cfg, 0.1, 0)
    assert len(images) == len(val) and sorted(labels.tolist()) == [0, 1, 2]


def test_without_labeled_validation_the_separate_split_is_used(tmp_path):
    cfg = _fake_study(tmp_path, labeled_val_every=0)
    assert len(labeled_val_indices(cfg, 0.1, 0)) == 0
    assert len(fraction_indices(cfg, 0.1, 0)) == 12
    assert len(validation_set(cfg, 0.1, 0)[0]) == 30


def test_the_rival_uses_only_unlabeled_training_images_never_test_or_their_labels(tmp_path, monkeypatch):
    cfg = _fake_study(tmp_path)
    rows = pseudo_labels.unlabeled_rows(cfg, 0.1, 0)
    labeled = set(fraction_indices(cfg, 0.1, 0)) | set(labeled_val_indices(cfg, 0.1, 0))
    assert not labeled & set(rows) and len(rows) == len(LABELS) - len(labeled)

    asked = []

    def images(cfg_, split, rows_=None):
        asked.append((split, None if rows_ is None else tuple(rows_)))
        return list(range(len(LABELS) if rows_ is None else len(rows_)))

    def predict(model, images_, batch_size, device):  # a classifier that is confident about everything
        import torch
        n = len(images_)
        probs = torch.full((n, 3), 0.025)
        probs[torch.arange(n), torch.arange(n) % 3] = 0.95
        return probs, torch.arange(n) % 3

    class Model:
        pass

    folder = StudyPaths(cfg).model("baseline_classifier_f0.1_s0")
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    monkeypatch.setattr(pseudo_labels, "split_images", images)
    monkeypatch.setattr(pseudo_labels, "predict", predict)
    monkeypatch.setattr(pseudo_labels, "baseline_classifier", lambda *a: Model())
    monkeypatch.setattr(pseudo_labels, "device", lambda cfg_: "cpu")
    ds, y, key = pseudo_labels.pseudo_label_images(cfg, 0.1, ratio=2.0, draw=0)
    assert all(split == "target_train" for split, _ in asked)
    assert len(y) == 2 * 9 and np.bincount(y.numpy()).tolist() == [6, 6, 6]  # ratio 2 x 3 real per class
    chosen_rows = asked[-1][1]
    assert not set(chosen_rows) & labeled


def test_choose_pseudo_labeled_respects_threshold_and_ratio():
    table = pd.DataFrame({"train_index": range(6), "pred": [0, 0, 0, 1, 1, 1],
                          "confidence": [0.99, 0.5, 0.95, 0.97, 0.96, 0.2]})
    chosen = pseudo_labels.choose_pseudo_labeled(table, np.array([1, 2]), ratio=1.0, threshold=0.9)
    assert chosen["train_index"].tolist() == [0, 3, 4]


def test_the_latent_classifiers_pseudo_labels_are_confident_unlabeled_rows_only(tmp_path, monkeypatch):
    cfg = _fake_study(tmp_path)
    labeled = set(fraction_indices(cfg, 0.1, 0)) | set(labeled_val_indices(cfg, 0.1, 0))
    rows = pseudo_labels.unlabeled_rows(cfg, 0.1, 0)
    preds = (LABELS[rows] + 1) % 3  # deliberately wrong labels: the true ones must never leak through
    table = pd.DataFrame({"train_index": rows[::-1], "pred": preds[::-1],
                          "confidence": np.linspace(0.5, 1.0, len(rows))})
    monkeypatch.setattr(pseudo_labels, "pseudo_label_table", lambda *a: table)
    chosen = pseudo_labels.confident_pseudo_labels(cfg, 0.1, 0, threshold=0.8)
    assert (chosen["confidence"] >= 0.8).all() and len(chosen) == int((table["confidence"] >= 0.8).sum())
    assert not set(chosen["train_index"]) & labeled
    assert chosen["train_index"].is_monotonic_increasing
    assert (chosen["pred"].to_numpy() == (LABELS[chosen["train_index"]] + 1) % 3).all()


def test_a_latent_source_takes_labels_from_elsewhere(tmp_path):
    import torch

    from hdlib.data.latents import LatentStore, LatentWriter
    from hdlib.errors import DataError

    writer = LatentWriter(tmp_path, "target_train", 6, (2, 2, 2), create=True)
    writer.write(np.arange(6), torch.randn(6, 2, 2, 2), torch.ones(6, 2, 2, 2))
    writer.scale(1.0)
    writer.finish(np.array([0, 0, 1, 1, 2, 2]))
    (tmp_path / "latents.json").write_text('{"scale": 1.0, "shape": [2, 2, 2], "counts": {"target_train": 6}}')
    store = LatentStore(tmp_path)
    own = store.source("target_train", [1, 4], labels=True)
    assert own.label_values.tolist() == [0, 2]
    pseudo = store.source("target_train", [1, 4], label_values=[2, 0])
    assert pseudo[torch.tensor([0, 1])][2].tolist() == [2, 0]
    with pytest.raises(DataError, match="1 label values for 2 rows"):
        store.source("target_train", [1, 4], label_values=[2])


def test_the_real_only_cells_model_is_the_draws_baseline(tmp_path, monkeypatch):
    """A stored real-only cell model is what baseline_classifier returns (no second training);
    another draw's or another setting's baseline is trained anew."""
    import torch

    from hdlib.evaluation.downstream import build_classifier
    from hdlib.study import classifiers

    cfg = _fake_study(tmp_path)
    model = build_classifier(cfg.downstream.backbone, num_classes=3, seed=5, image_size=cfg.data.image_size)
    classifiers.store_baseline(cfg, 0.1, 0, model, pd.DataFrame({"step": [1]}))
    trained = []

    def fit(*a, seed, **k):
        trained.append(seed)
        return build_classifier(cfg.downstream.backbone, num_classes=3, seed=9), pd.DataFrame({"step": [1]})

    monkeypatch.setattr(classifiers, "fit_image_classifier", fit)
    monkeypatch.setattr(classifiers, "split_images", lambda *a: None)
    loaded = classifiers.baseline_classifier(cfg, 0.1, 0)
    assert trained == []
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    classifiers.baseline_classifier(cfg, 0.05, 0)  # a smaller subset: not this model
    assert trained == [classifiers.real_only_seed(0)]


def test_a_baseline_trained_outside_the_grid_uses_a_grid_cells_thread_count(tmp_path, monkeypatch):
    """The draw's baseline classifier trains with the torch thread count of a downstream grid worker also
    when a stage trains it (its real-only cell already done, e.g. committed): float sums follow the thread
    count, so a fresh clone's stage 03 trained other baselines (2 threads) than the workers had (1), and its
    filter and pseudo-labels moved. The process's own count is restored after."""
    import torch

    from hdlib.evaluation.downstream import build_classifier
    from hdlib.parallel import grid
    from hdlib.parallel.threads import torch_threads
    from hdlib.study import classifiers

    import dataclasses

    cfg = _fake_study(tmp_path)
    cfg = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, workers=2))
    monkeypatch.setattr(grid.os, "cpu_count", lambda: 6)  # 2 workers of 3 threads each
    seen = []

    def fit(*a, seed, **k):
        seen.append(torch.get_num_threads())
        return build_classifier(cfg.downstream.backbone, num_classes=3, seed=9), pd.DataFrame({"step": [1]})

    monkeypatch.setattr(classifiers, "fit_image_classifier", fit)
    monkeypatch.setattr(classifiers, "split_images", lambda *a: None)
    with torch_threads(2):
        classifiers.baseline_classifier(cfg, 0.1, 0)
        assert torch.get_num_threads() == 2
    assert seen == [3]


def test_computing_the_pseudo_label_table_leaves_the_global_rng_as_a_cached_read_does(tmp_path, monkeypatch):
    """The table is predicted once (a DataLoader, which draws its seed from the global RNG) and read from
    disk after. The latent classifier's weights are drawn after it in one seeded block, so a fresh clone's
    stage 03 (table not yet cached) trained other latent classifiers than a re-run (cached) did: its
    guidance choice moved. Computing it must leave the RNG exactly as reading it does."""
    import torch

    from hdlib.evaluation.downstream import build_classifier

    cfg = _fake_study(tmp_path)
    n = len(LABELS)
    images = torch.utils.data.TensorDataset(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.zeros(n, dtype=torch.long))
    model = build_classifier("resnet10t", num_classes=3, seed=1)
    folder = StudyPaths(cfg).model("baseline_classifier_f0.1_s0")
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    monkeypatch.setattr(pseudo_labels, "split_images", lambda cfg_, split, rows=None: torch.utils.data.Subset(
        images, list(range(n)) if rows is None else list(rows)))
    monkeypatch.setattr(pseudo_labels, "baseline_classifier", lambda *a: model)
    monkeypatch.setattr(pseudo_labels, "device", lambda cfg_: "cpu")

    def draw_after_table():
        torch.manual_seed(0)
        table = pseudo_labels.pseudo_label_table(cfg, 0.1, 0)
        return table, torch.rand(3)

    computed, after_computing = draw_after_table()
    assert list(folder.glob("pseudo_labels-*.csv"))  # now cached
    read, after_reading = draw_after_table()
    assert torch.equal(after_computing, after_reading)
    assert computed["train_index"].tolist() == read["train_index"].tolist()

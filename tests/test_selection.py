"""Which accepted synthetic images are kept first (filtering.selection): closest (the paper's),
random (seeded) and diverse (greedy farthest-point), in filter_synthetic and across the rounds
of fill_quota."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_config import ROOT
from test_method import CLASSES, fake_sample, seeds_of

from hdlib.config import load_config
from hdlib.errors import ConfigError
from hdlib.sampling.filtering import (
    FeatureFilter,
    filter_synthetic,
    random_keys,
    selection_order,
)
from hdlib.sampling.quota import fill_quota

SELECTIONS = ("closest", "random", "diverse")

# class 0 around (1, 0), class 1 around (-1, 0); raw features (normalize=False)
REAL = np.array([[1, 0], [1, 0.2], [1, -0.2], [-1, 0], [-1, 0.2], [-1, -0.2]], dtype=float)
REAL_Y = np.array([0, 0, 0, 1, 1, 1])
rng = np.random.default_rng(0)
# class 0: a tight clump at its centroid and four far-apart corners; class 1: a spread cloud
CLUMP = np.array([1.0, 0.0]) + 0.01 * rng.standard_normal((8, 2))
CORNERS = np.array([[0.6, 0.5], [0.6, -0.5], [1.4, 0.5], [1.4, -0.5]])
CLOUD = np.array([-1.0, 0.0]) + 0.3 * rng.standard_normal((12, 2))
WRONG = np.array([[-0.9, 0.0], [0.9, 0.1]])  # each nearest the other class's centroid
SYN = np.concatenate([CORNERS[:2], CLUMP, CORNERS[2:], CLOUD, WRONG])
SYN_Y = np.array([0] * 12 + [1] * 12 + [0, 1])
CONF = np.full(len(SYN), 0.9)


def run(selection, quota=4, seed=0, **kw):
    return filter_synthetic(REAL, REAL_Y, SYN, SYN_Y, CONF, num_classes=2, quota=quota, normalize=False,
                            selection=selection, seed=seed, **kw)


def mean_pairwise(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return d[np.triu_indices(len(x), 1)].mean()


def first_k(res, c, k):
    idx = np.flatnonzero((SYN_Y == c) & (res.rank >= 0))
    return idx[np.argsort(res.rank[idx])][:k]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_each_selection_keeps_exactly_the_quota_from_the_same_accepted_pool(selection):
    res, ref = run(selection), run("closest")
    accepted = res.rank >= 0
    assert np.array_equal(accepted, ref.rank >= 0)  # the same pool passes steps 1-3
    assert list(np.flatnonzero(~accepted)) == [24, 25]  # only the wrong-centroid items
    assert res.summary["kept"].tolist() == [4, 4] and res.summary["over_quota"].tolist() == [8, 8]
    for c in (0, 1):
        ranks = np.sort(res.rank[accepted & (SYN_Y == c)])
        assert ranks.tolist() == list(range(12))  # a full order, 0 = first choice
        assert set(np.flatnonzero(res.keep & (SYN_Y == c))) == set(first_k(res, c, 4))  # kept = first by rank
    # everything but the rank and the kept / over-quota split is the same for every selection
    assert np.array_equal(res.distance, ref.distance) and np.array_equal(res.nearest_class, ref.nearest_class)


def test_closest_ranks_by_centroid_distance():
    res = run("closest", quota=None)
    for c in (0, 1):
        idx = np.flatnonzero(SYN_Y[:24] == c)
        assert np.array_equal(idx[np.argsort(res.distance[idx], kind="stable")], first_k(res, c, 12))
    assert set(first_k(run("closest"), 0, 4)) <= set(range(2, 10))  # class 0 keeps four of the clump


def test_random_is_seeded():
    a, b, other = run("random", seed=3), run("random", seed=3), run("random", seed=4)
    assert np.array_equal(a.rank, b.rank) and np.array_equal(a.keep, b.keep)
    assert not np.array_equal(a.rank, other.rank)
    assert not np.array_equal(a.rank, run("closest").rank)
    # the key of candidate k of class c depends only on (seed, c, k): a longer stream has the same prefix
    assert np.array_equal(random_keys(3, 0, [0, 4, 2]), random_keys(3, 0, np.arange(50))[[0, 4, 2]])
    assert not np.array_equal(random_keys(3, 0, np.arange(5)), random_keys(3, 1, np.arange(5)))


def test_diverse_spreads_the_first_choices():
    div, clo = run("diverse"), run("closest")
    for c in (0, 1):
        assert first_k(div, c, 1) == first_k(clo, c, 1)  # starts from the one closest to the centroid
        assert mean_pairwise(SYN[first_k(div, c, 4)]) > mean_pairwise(SYN[first_k(clo, c, 4)])
    assert set(first_k(div, 0, 5)[1:]) == {0, 1, 10, 11}  # then the four corners
    # greedy: each next pick is the candidate farthest from all chosen so far
    order = first_k(run("diverse", quota=None), 1, 12)
    for j in range(1, len(order)):
        rest = order[j:]
        gaps = np.linalg.norm(SYN[rest][:, None] - SYN[order[:j]][None], axis=-1).min(1)
        assert gaps[0] == gaps.max()


def test_diverse_works_in_the_normalised_space():
    # with normalize=True the distances are between directions: scaling a candidate changes nothing
    syn = SYN.copy()
    syn[[0, 5]] *= 7.0
    kw = dict(num_classes=2, quota=4, selection="diverse")
    a = filter_synthetic(REAL, REAL_Y, SYN, SYN_Y, CONF, **kw)
    b = filter_synthetic(REAL, REAL_Y, syn, SYN_Y, CONF, **kw)
    assert np.array_equal(a.rank, b.rank)


def test_selection_order_errors():
    with pytest.raises(ValueError, match="unknown selection 'best'"):
        selection_order([0.1, 0.2], "best")
    with pytest.raises(ValueError, match="unknown selection"):
        run("farthest")
    with pytest.raises(Exception, match="needs the candidates' features"):
        selection_order([0.1, 0.2], "diverse")
    assert selection_order([], "diverse", features=np.zeros((0, 2))).tolist() == []


def test_config_rejects_an_unknown_selection():
    assert load_config(ROOT / "params/smoke.yaml").filtering.selection == "closest"
    assert load_config(ROOT / "params/smoke.yaml", ["filtering.selection=diverse"]).filtering.selection == "diverse"
    with pytest.raises(ConfigError, match="filtering.selection: 'best' is not one of closest, random, diverse") as e:
        load_config(ROOT / "params/smoke.yaml", ["filtering.selection=best"])
    assert "\n" not in str(e.value)


# --- across the rounds of fill_quota ------------------------------------------------------------


class PointJudge:
    """Class A: everything accepted; class B: seeds divisible by 3; class C: never. Each candidate's
    feature is a point on a circle set by its seed, so distances and spreads differ."""

    def __init__(self, selection="closest", seed=0):
        self.selection, self.seed = selection, seed

    def __call__(self, images, labels, return_features=False):
        seeds = images[:, 0, 0, 0].long().numpy()
        ok = [(y == 0) or (y == 1 and int(s) % 3 == 0) for s, y in zip(seeds, labels.tolist())]
        angle = seeds * 2.399963  # golden angle: spread, no two alike
        feats = np.stack([np.cos(angle), np.sin(angle)], 1)
        frame = pd.DataFrame({"accepted": ok, "reason": ["kept" if o else "low_confidence" for o in ok],
                              "distance": np.abs(np.sin(angle / 2)) * 2, "confidence": 0.9, "nn_distance": 1.0,
                              "nn_train_index": 0, "near_copy": False})
        return (frame, feats) if return_features else frame


def quota_set(path, selection, seed=0, quota=(5, 4, 3), sample=fake_sample):
    return fill_quota(path, CLASSES, list(quota), sample, seeds_of, {"r": 1}, judge=PointJudge(),
                      selection=selection, seed=seed, cap_factor=4.0)


def test_fill_quota_each_selection_keeps_the_quota_from_the_same_pool(tmp_path):
    sets = {s: quota_set(tmp_path / s, s, seed=7) for s in SELECTIONS}
    pool = {s: set(map(tuple, df[df["accepted"]][["label", "index"]].to_numpy())) for s, df in sets.items()}
    assert pool["closest"] == pool["random"] == pool["diverse"]
    for df in sets.values():  # B's accepted candidates come from more than one round
        assert df[(df["label"] == 1) & df["accepted"]]["round"].nunique() > 1
    for s, df in sets.items():
        assert df[df["kept"]].groupby("label").size().reindex(range(3), fill_value=0).tolist() == [5, 4, 0], s
        for c in (0, 1):
            acc = df[(df["label"] == c) & df["accepted"]].sort_values("rank")
            assert acc["rank"].tolist() == list(range(len(acc)))
            assert acc["kept"].tolist() == [True] * (5 - c) + [False] * (len(acc) - 5 + c)  # the first by rank
    closest = sets["closest"]
    b = closest[(closest["label"] == 1) & closest["accepted"]]
    assert b.sort_values("rank")["distance"].is_monotonic_increasing
    assert not (tmp_path / "closest" / "features-r0000.npz").exists()  # nothing new on disk for the paper's
    assert "selection" not in json.loads((tmp_path / "closest" / "request.json").read_text())["request"]
    assert json.loads((tmp_path / "random" / "request.json").read_text())["request"]["selection_seed"] == 7


def test_fill_quota_random_order_is_over_all_rounds_and_seeded(tmp_path):
    a, b, other = (quota_set(tmp_path / n, "random", seed=s) for n, s in (("a", 3), ("b", 3), ("o", 4)))
    cols = ["label", "index", "rank", "kept"]
    assert a[cols].equals(b[cols]) and not a[cols].equals(other[cols])
    for c in (0, 1):  # the order of all accepted candidates of the class, by their keys alone
        acc = a[(a["label"] == c) & a["accepted"]]
        keys = random_keys(3, c, acc["index"])
        assert acc.sort_values("rank")["index"].tolist() == acc["index"].to_numpy()[np.argsort(keys)].tolist()


def test_fill_quota_diverse_order_over_all_rounds_and_resumable(tmp_path):
    fresh = quota_set(tmp_path / "fresh", "diverse")
    assert (tmp_path / "fresh" / "features-r0001.npz").exists()
    b = fresh[(fresh["label"] == 1) & fresh["accepted"]].sort_values("rank")
    assert b["round"].nunique() > 1
    f = np.stack([np.cos(b["seed"] * 2.399963), np.sin(b["seed"] * 2.399963)], 1)
    assert b.iloc[0]["distance"] == b["distance"].min()
    for j in range(1, 4):  # greedy farthest-point over the candidates of every round
        gaps = np.linalg.norm(f[j:][:, None] - f[:j][None], axis=-1).min(1)
        assert gaps[0] == gaps.max()
    clo = quota_set(tmp_path / "closest", "closest")
    pts = [np.stack([np.cos(g["seed"] * 2.399963), np.sin(g["seed"] * 2.399963)], 1)
           for g in (d[(d["label"] == 0) & d["kept"]] for d in (fresh, clo))]  # A: 5 kept of 10 accepted
    assert len(pts[0]) == len(pts[1]) == 5 and mean_pairwise(pts[0]) > mean_pairwise(pts[1])

    calls = []

    def dying_sample(labels, seeds):
        calls.append(len(labels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fake_sample(labels, seeds)

    with pytest.raises(KeyboardInterrupt):
        quota_set(tmp_path / "k", "diverse", sample=dying_sample)
    resumed = quota_set(tmp_path / "k", "diverse")
    cols = ["label", "index", "seed", "round", "accepted", "kept", "rank", "decision"]
    assert resumed[cols].equals(fresh[cols])


def test_fill_quota_a_changed_selection_starts_over_and_the_judge_sets_the_default(tmp_path):
    first = quota_set(tmp_path / "s", "closest")
    again = fill_quota(tmp_path / "s", CLASSES, [5, 4, 3], fake_sample, seeds_of, {"r": 1},
                       judge=PointJudge("diverse"))  # selection from the judge
    assert json.loads((tmp_path / "s" / "request.json").read_text())["request"]["selection"] == "diverse"
    assert not again["rank"].equals(first["rank"])
    assert again[["label", "index", "rank"]].equals(quota_set(tmp_path / "d", "diverse")[["label", "index", "rank"]])
    with pytest.raises(ValueError, match="unknown selection"):
        quota_set(tmp_path / "x", "best")


def test_feature_filter_returns_its_features_and_saves_its_selection(tmp_path):
    from hdlib.evaluation.downstream import build_classifier

    model = build_classifier("resnet18", num_classes=2, image_size=16)
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    from hdlib.evaluation.downstream import extract_features

    ff = FeatureFilter(model, extract_features(model, real), torch.tensor([0, 0, 0, 1, 1, 1]), 0.0, 0.0,
                       ["A", "B"], selection="random", seed=5)
    syn = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    frame, feats = ff(syn, torch.tensor([0, 1, 0, 1]), return_features=True)
    assert frame.equals(ff(syn, torch.tensor([0, 1, 0, 1])))
    assert feats.shape == (4, ff.real_f.shape[1]) and np.allclose(np.linalg.norm(feats, axis=1), 1.0)
    ff.save(tmp_path / "f", "resnet18", 16)
    back = FeatureFilter.load(tmp_path / "f")
    assert (back.selection, back.seed) == ("random", 5)
    FeatureFilter(model, ff.real_f, ff.real_y, 0.0, 0.0, ["A", "B"]).save(tmp_path / "c", "resnet18", 16)
    assert "selection" not in json.loads((tmp_path / "c" / "config.json").read_text())
    assert FeatureFilter.load(tmp_path / "c").selection == "closest"
    with pytest.raises(ValueError, match="unknown selection"):
        FeatureFilter(model, ff.real_f, ff.real_y, 0.0, 0.0, ["A", "B"], selection="best")

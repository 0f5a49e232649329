"""Selective filtering on hand-made 2-D features: every rule, quotas, errors."""

import numpy as np
import pytest

from hdlib.errors import DataError
from hdlib.sampling.filtering import REASONS, filter_synthetic

# class 0 around (1, 0), class 1 around (-1, 0): centroids exactly (1, 0) and (-1, 0)
REAL = np.array([[1, 0], [1, 0.2], [1, -0.2], [-1, 0], [-1, 0.2], [-1, -0.2]])
REAL_Y = np.array([0, 0, 0, 1, 1, 1])
SYN = np.array([
    [0.9, 0.0],    # 0: class 0, distance 0.1               -> kept, rank 0
    [0.5, 0.0],    # 1: class 0, distance 0.5               -> rank 2: over a quota of 2
    [-0.8, 0.0],   # 2: class 0 but nearest centroid is 1   -> wrong_centroid
    [0.7, 0.1],    # 3: class 0, confidence 0.2 < tau       -> low_confidence
    [1.0, 0.2],    # 4: class 0, a copy of a real image     -> near_copy
    [0.6, 0.0],    # 5: class 0, distance 0.4               -> kept, rank 1
    [-1.1, 0.05],  # 6: class 1                             -> kept, rank 0
    [0.95, 0.0],   # 7: class 1 but nearest centroid is 0   -> wrong_centroid
])
SYN_Y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
CONF = np.array([0.9, 0.9, 0.9, 0.2, 0.9, 0.9, 0.99, 0.9])


def run(**kw):
    args = dict(num_classes=2, tau=0.5, quota=2, train_features=REAL, delta=0.05, normalize=False)
    args.update(kw)
    return filter_synthetic(REAL, REAL_Y, SYN, SYN_Y, CONF, **args)


def test_each_rule_keeps_and_drops_the_expected_items():
    res = run()
    assert list(res.reason) == ["kept", "over_quota", "wrong_centroid", "low_confidence", "near_copy", "kept", "kept",
                                "wrong_centroid"]
    assert list(res.keep) == [True, False, False, False, False, True, True, False]
    # rank by distance to the class centroid, closest first (not input order)
    assert list(res.rank) == [0, 2, -1, -1, -1, 1, 0, -1]
    np.testing.assert_allclose(res.distance[[0, 5, 1]], [0.1, 0.4, 0.5])
    assert list(res.nearest_class) == [0, 0, 1, 0, 0, 0, 1, 0]
    s = res.summary.set_index("class_id")
    assert s.loc[0, ["candidates", "kept", "wrong_centroid", "low_confidence", "near_copy", "over_quota"]].tolist() == \
        [6, 2, 1, 1, 1, 1]
    assert s.loc[1, ["candidates", "kept", "wrong_centroid", "over_quota"]].tolist() == [2, 1, 1, 0]
    assert (s["kept"] + s[list(REASONS[1:])].sum(axis=1) == s["candidates"]).all()


def test_quota_variants():
    # no quota: every item passing the rules is kept
    assert list(run(quota=None).reason).count("over_quota") == 0
    # a quota larger than the candidates keeps all of them
    assert run(quota=100).keep.sum() == 4
    # per-class dict; classes left out are unlimited
    res = run(quota={0: 1})
    assert list(np.flatnonzero(res.keep)) == [0, 6]
    assert list(res.reason[[5, 1]]) == ["over_quota", "over_quota"]
    # ratio of the real count: floor(0.34 x 3) = 1 per class
    res = run(quota=None, quota_ratio=0.34)
    assert list(np.flatnonzero(res.keep)) == [0, 6]
    assert run(quota=0).keep.sum() == 0
    with pytest.raises(ValueError, match="not both"):
        run(quota=2, quota_ratio=1.0)
    with pytest.raises(DataError, match="unknown class id 4"):
        run(quota={4: 1})


def test_confidence_threshold_and_near_copy_switches():
    assert run(tau=0.0).reason[3] == "kept"  # the low-confidence item passes without a threshold
    no_copy_check = run(train_features=None, delta=None, quota=None)
    assert no_copy_check.reason[4] == "kept" and "near_copy" not in no_copy_check.reason
    # a larger delta also catches item 0 (0.1 from the real (1, 0))
    assert run(delta=0.15).reason[0] == "near_copy"
    # cosine distance ignores the norm: (2, 0.4) has the direction of the real (1, 0.2)
    syn = SYN.copy()
    syn[4] = [2.0, 0.4]
    common = dict(num_classes=2, tau=0.5, train_features=REAL, delta=0.05, normalize=False)
    assert filter_synthetic(REAL, REAL_Y, syn, SYN_Y, CONF, near_copy_metric="cosine", **common).reason[4] == "near_copy"
    assert filter_synthetic(REAL, REAL_Y, syn, SYN_Y, CONF, **common).reason[4] != "near_copy"


def test_normalisation_changes_the_centroid_rule():
    real = np.array([[2.0, 0.0], [10.0, 0.0], [0.0, 3.0]])
    real_y = np.array([0, 0, 1])
    syn = np.array([[2.9, 2.0]])  # direction of class 0, but closer to class 1's raw centroid (0, 3)
    kw = dict(num_classes=2)
    assert filter_synthetic(real, real_y, syn, [0], [1.0], normalize=True, **kw).reason[0] == "kept"
    assert filter_synthetic(real, real_y, syn, [0], [1.0], normalize=False, **kw).reason[0] == "wrong_centroid"


def test_bad_inputs_fail_with_one_line_errors():
    with pytest.raises(DataError, match="syn_labels has unknown class id 5"):
        filter_synthetic(REAL, REAL_Y, SYN, np.r_[SYN_Y[:-1], 5], CONF, num_classes=2)
    with pytest.raises(DataError, match="class BACK \\(id 1\\) has no real image"):
        filter_synthetic(REAL[:3], REAL_Y[:3], SYN, SYN_Y, CONF, num_classes=2, class_names=["ADI", "BACK"])
    with pytest.raises(DataError, match="no synthetic candidates"):
        filter_synthetic(REAL, REAL_Y, np.zeros((0, 2)), [], [], num_classes=2)
    with pytest.raises(DataError, match="syn_confidence has 7 entries"):
        filter_synthetic(REAL, REAL_Y, SYN, SYN_Y, CONF[:7], num_classes=2)
    with pytest.raises(DataError, match="real_labels has 5 entries"):
        filter_synthetic(REAL, REAL_Y[:5], SYN, SYN_Y, CONF, num_classes=2)
    with pytest.raises(DataError, match="2 dims but syn_features have 3"):
        filter_synthetic(REAL, REAL_Y, np.ones((2, 3)), [0, 1], [1, 1], num_classes=2)
    with pytest.raises(DataError, match="NaN"):
        filter_synthetic(REAL, REAL_Y, np.array([[np.nan, 0.0]]), [0], [1.0], num_classes=2)
    with pytest.raises(ValueError, match="both train_features and delta"):
        filter_synthetic(REAL, REAL_Y, SYN, SYN_Y, CONF, num_classes=2, delta=0.1)
    with pytest.raises(DataError) as info:
        filter_synthetic(REAL, REAL_Y, SYN, np.r_[SYN_Y[:-1], 5], CONF, num_classes=2)
    assert "\n" not in str(info.value)


def test_inputs_are_not_modified():
    real, syn, conf = REAL.copy(), SYN.copy(), CONF.copy()
    filter_synthetic(real, REAL_Y, syn, SYN_Y, conf, num_classes=2, tau=0.5, train_features=real, delta=0.05)
    assert np.array_equal(real, REAL) and np.array_equal(syn, SYN) and np.array_equal(conf, CONF)

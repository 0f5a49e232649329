"""The method's accounting: exact per-class quotas (with a cap and an honest shortfall),
resumable quota filling, label subsets re-drawn per seed yet nested across fractions, and the
near-copy threshold calibrated per class from real data."""

import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from hdlib.sampling.filtering import calibrate_delta, filter_synthetic
from hdlib.sampling.quota import fill_quota

CLASSES = ["A", "B", "C"]


def fake_sample(labels, seeds):
    """A stand-in generator: image content encodes the seed (so a judge can decide on it)."""
    out = torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8)
    for i, s in enumerate(seeds):
        out[i] = int(s) % 251
    return out


class ParityJudge:
    """Accepts class-A images always, class-B images with an even seed, class-C never."""

    def __call__(self, images, labels):
        seeds = images[:, 0, 0, 0].long()
        ok = [(y == 0) or (y == 1 and int(s) % 2 == 0) for s, y in zip(seeds, labels.tolist())]
        return pd.DataFrame({"accepted": ok, "reason": ["kept" if o else "low_confidence" for o in ok],
                             "distance": seeds.float().numpy() / 251, "confidence": 0.9, "nn_distance": 1.0,
                             "nn_train_index": 0, "near_copy": False})


def seeds_of(c, start, n):
    return c * 1000 + start + np.arange(n)


def test_quota_is_filled_exactly_with_a_cap_and_an_honest_shortfall(tmp_path):
    df = fill_quota(tmp_path / "set", CLASSES, [5, 4, 3], fake_sample, seeds_of, {"r": 1}, judge=ParityJudge(),
                    cap_factor=4.0)
    kept = df[df["kept"]].groupby("label").size().reindex(range(3), fill_value=0).tolist()
    assert kept == [5, 4, 0]  # A and B exactly their quota; C never accepted
    made = df.groupby("label").size().tolist()
    assert made[2] == 12  # C stopped at the cap (4 x quota 3), not more
    assert made[1] >= 8 and (df[df["label"] == 1]["seed"] % 2 == 0).sum() >= 4  # more rounds until B was full
    assert set(df["decision"]) <= {"kept", "over_quota", "low_confidence"}
    b = df[(df["label"] == 1) & df["accepted"]].sort_values("distance")
    assert b["kept"].tolist() == [True] * 4 + [False] * (len(b) - 4)  # the closest accepted ones are kept
    assert len(list((tmp_path / "set").glob("*.png"))) == len(df)


def test_unfiltered_quota_is_exact_and_a_rerun_is_reused(tmp_path):
    df = fill_quota(tmp_path / "u", CLASSES, 3, fake_sample, seeds_of, {"r": 2})
    assert df.groupby("label")["kept"].sum().tolist() == [3, 3, 3] and len(df) == 9
    mtime = (tmp_path / "u" / "manifest.csv").stat().st_mtime_ns
    again = fill_quota(tmp_path / "u", CLASSES, 3, fake_sample, seeds_of, {"r": 2})
    assert again.equals(pd.read_csv(tmp_path / "u" / "manifest.csv"))
    assert (tmp_path / "u" / "manifest.csv").stat().st_mtime_ns == mtime
    other = fill_quota(tmp_path / "u", CLASSES, 2, fake_sample, seeds_of, {"r": 2})  # another request: redone
    assert len(other) == 6 and len(list((tmp_path / "u").glob("*.png"))) == 6


def test_quota_filling_resumes_after_a_kill(tmp_path):
    calls = []

    def dying_sample(labels, seeds):
        calls.append(len(labels))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second round
        return fake_sample(labels, seeds)

    with pytest.raises(KeyboardInterrupt):
        fill_quota(tmp_path / "k", CLASSES, [5, 4, 3], dying_sample, seeds_of, {"r": 3}, judge=ParityJudge())
    first_round = pd.read_csv(tmp_path / "k" / "manifest.csv")
    assert set(first_round["round"]) == {0}
    resumed = fill_quota(tmp_path / "k", CLASSES, [5, 4, 3], fake_sample, seeds_of, {"r": 3}, judge=ParityJudge())
    fresh = fill_quota(tmp_path / "fresh", CLASSES, [5, 4, 3], fake_sample, seeds_of, {"r": 3}, judge=ParityJudge())
    cols = ["label", "index", "seed", "round", "accepted", "kept", "decision"]
    assert resumed[cols].equals(fresh[cols])  # the same candidates and decisions as an unbroken run


def test_label_subsets_are_redrawn_per_seed_and_nested_across_fractions(tmp_path):
    from tests.test_stage_data import _cfg, _png  # noqa: F401 - shared dataset builder

    for split, n in (("train", 20), ("test", 3)):
        for k, c in enumerate(CLASSES):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                _png(tmp_path / split / c / f"{c}_{i}.png", zlib.crc32(f"{split}{k}{i}".encode()))
    (tmp_path / "pool").mkdir()
    for i in range(30):
        _png(tmp_path / "pool" / f"p{i}.png", 10_000 + i)
    from hdlib.study.preparation import prepare_data
    from hdlib.study.splits import fraction_indices

    cfg = _cfg(tmp_path, "data.label_fractions=[0.25,0.5,1.0]", "downstream.fractions=[0.25,0.5]",
               "downstream.seeds=[0,1,2]")
    prepare_data(cfg)
    subsets = {(f, d): set(fraction_indices(cfg, f, d)) for f in (0.25, 0.5, 1.0) for d in (0, 1, 2)}
    for d in (0, 1, 2):
        assert subsets[(0.25, d)] < subsets[(0.5, d)] < subsets[(1.0, d)]  # nested within a draw
    assert len({frozenset(subsets[(0.25, d)]) for d in (0, 1, 2)}) == 3  # each seed re-draws
    assert len({len(subsets[(0.25, d)]) for d in (0, 1, 2)}) == 1  # the same size every draw


def test_near_copy_threshold_is_calibrated_per_class():
    rng = np.random.default_rng(0)
    d = 16
    # class 0: near-empty background, all alike; class 1: varied tissue
    train0 = np.ones((10, d)) + 0.01 * rng.standard_normal((10, d))
    train1 = rng.standard_normal((10, d)) * 3
    val0 = np.ones((10, d)) + 0.01 * rng.standard_normal((10, d))
    val1 = rng.standard_normal((10, d)) * 3
    train = np.concatenate([train0, train1])
    ty = np.repeat([0, 1], 10)
    delta = calibrate_delta(train, ty, np.concatenate([val0, val1]), np.repeat([0, 1], 10), 2, percentile=5)
    assert delta[0] < delta[1] / 10  # alike-by-nature class gets a far smaller threshold
    # a copy of a class-1 training image is flagged; a fresh class-0 background tile is not
    syn = np.stack([train1[3] + 1e-4, np.ones(d) + 0.01 * rng.standard_normal(d)])
    res = filter_synthetic(train, ty, syn, [1, 0], [1.0, 1.0], num_classes=2, train_features=train, delta=delta)
    assert res.near_copy.tolist() == [True, False]
    one = filter_synthetic(train, ty, syn, [1, 0], [1.0, 1.0], num_classes=2, train_features=train,
                           delta=float(delta[1]))
    assert one.near_copy.tolist() == [True, True]  # one global threshold would flag the background tile


def test_guided_faithfulness_per_class_shares(monkeypatch):
    """Per class: the reference's accuracy and most frequent other call, and the guiding latent
    classifier's agreement on the re-encoded images (here a stub that always calls class 0)."""
    from types import SimpleNamespace

    import pandas as pd
    from diffusers import AutoencoderKL

    from hdlib.study import faithfulness as synthesis
    from hdlib.study.faithfulness import guided_class_judgement, guided_faithfulness

    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))

    class AlwaysClassZero(torch.nn.Module):
        def forward(self, z, t):
            assert z.shape[1] == 4 and (t == 0).all()
            return torch.tensor([5.0, 0.0, 0.0]).expand(len(z), 3)

    cfg = SimpleNamespace(data=SimpleNamespace(classes=["ADI", "LYM", "TUM"]), study=SimpleNamespace(device="cpu"))
    gen = SimpleNamespace(vae=vae, scale=1.0, device="cpu")
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    ref = torch.tensor([0, 2, 2, 2, 2, 1, 2, 2])
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    kept = pd.DataFrame({"index": range(8), "label": labels.numpy()})
    monkeypatch.setattr(synthesis, "_in_memory", lambda cfg_, df: (images[df["index"].to_numpy()], labels[df["index"].to_numpy()]))
    monkeypatch.setattr(synthesis, "predict", lambda model, x, batch_size, device: (None, ref[: len(x)]))
    monkeypatch.setattr(synthesis, "device", lambda cfg_: "cpu")
    got_labels, got_ref, latent_pred = guided_class_judgement(cfg, kept.iloc[::-1], object(), AlwaysClassZero(), gen)
    assert got_labels.tolist() == labels.tolist() and got_ref.tolist() == ref.tolist()  # in request order
    assert latent_pred.tolist() == [0] * 8
    rows = {r["class"]: r for r in guided_faithfulness(cfg, got_labels, got_ref, latent_pred)}
    assert rows["ADI"]["reference_accuracy"] == 0.5 and rows["ADI"]["reference_most_frequent_other"] == "TUM"
    assert rows["LYM"]["reference_accuracy"] == 0.25 and rows["LYM"]["reference_most_frequent_other"] == "TUM"
    assert rows["LYM"]["reference_most_frequent_other_share"] == 0.75
    assert rows["TUM"]["reference_accuracy"] == 1.0 and rows["TUM"]["reference_most_frequent_other"] == ""
    assert rows["ADI"]["latent_classifier_agreement"] == 1.0 and rows["LYM"]["latent_classifier_agreement"] == 0.0


def test_class_faithfulness_judges_each_candidate_once_and_kept_is_its_subset(monkeypatch):
    """Kept images are a subset of the candidates: one judgement per draw serves both entries, and the
    kept entry equals judging the kept images alone (a draw that kept nothing adds nothing to it)."""
    from types import SimpleNamespace

    import pandas as pd

    from hdlib.study import faithfulness as synthesis

    cfg = SimpleNamespace(data=SimpleNamespace(classes=["ADI", "LYM", "TUM"]))
    calls = []

    def judge(cfg_, frame, reference, latent_classifier, gen):  # calls that depend on the image only
        calls.append(frame["index"].tolist())
        idx = torch.as_tensor(frame["index"].to_numpy())
        return torch.as_tensor(frame["label"].to_numpy()), idx % 3, (idx + 1) % 3

    monkeypatch.setattr(synthesis, "guided_class_judgement", judge)
    monkeypatch.setattr(synthesis, "load_latent_classifier", lambda *a: None)
    monkeypatch.setattr(synthesis, "primary_fraction", lambda cfg_: 0.25)
    draw0 = pd.DataFrame({"index": [5, 1, 3, 0, 4, 2], "label": [2, 1, 0, 0, 1, 2],
                          "kept": [True, False, True, True, False, False]})
    draw1 = pd.DataFrame({"index": [6, 7, 8], "label": [0, 1, 2], "kept": [False, False, False]})
    got = synthesis.class_faithfulness(cfg, [(0, draw0), (1, draw1)], None, None)
    assert calls == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]  # every candidate once, in index order
    kept = draw0[draw0["kept"]].sort_values("index")
    alone = synthesis._faithfulness_summary(cfg, [judge(cfg, kept, None, None, None)])
    assert got["kept"] == alone and got["kept"]["n"] == 3 and got["candidates"]["n"] == 9
    nothing_kept = synthesis.class_faithfulness(cfg, [(1, draw1)], None, None)
    assert nothing_kept["kept"]["accuracy"] is None and nothing_kept["kept"]["classes_without_images"] == cfg.data.classes

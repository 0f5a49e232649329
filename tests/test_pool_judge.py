"""The provenance-trained judge (hdlib.pool_judge): the generator's class of a pool tile is
re-derived exactly, the judge learns provenance from tiles, and its readings (mixture, copying)
measure what they say."""

import numpy as np
import pytest
import torch

from hdlib import demo as D
from hdlib.demo.files import png_bytes
from hdlib.evaluation.pool_judge import (
    JudgeTraining,
    copying_rate,
    load_judge,
    mixture,
    provenance_labels,
    save_judge,
    total_variation,
    train_pool_judge,
)

TINY = dict(image_size=24, n_train_per_class=1, n_test_per_class=1, n_pool_per_style=12,
            pool_styles=("classic", "pale"), target_style="target", difficulty=0.5, seed=3, progress=False)


def test_pool_tile_class_re_derives_the_class_the_generator_drew(tmp_path):
    """Rendering a pool tile again with the re-derived class gives the very bytes on disk."""
    demo = D.build_demo_data(tmp_path / "demo", **TINY)
    seen = set()
    for style in TINY["pool_styles"]:
        for f in sorted(demo.pool_dirs[f"procedural_{style}"].glob("*.png")):
            cls = D.pool_tile_class(f)
            ci = D.CRC_CLASSES.index(cls)
            again = D.render_tile(cls, TINY["image_size"], D.tile_rng(TINY["seed"], "pool", ci, int(f.stem), style),
                                  style, TINY["difficulty"])
            assert png_bytes(again) == f.read_bytes(), f
            seen.add(cls)
    assert len(seen) == len(D.CRC_CLASSES)  # 12 balanced tiles per style cover all 9 classes
    target = next(demo.target_train.rglob("*.png"))
    assert D.pool_tile_class(target) is None
    assert D.pool_tile_class(tmp_path / "pool" / "procedural_classic" / "00001.png") is None  # no build there


class _Tiles(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], -1


def _tiles(n, striped, g):
    """Random flat colours, half of them with stripes: the colour says nothing, the texture all."""
    col = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, 32, 32)
    stripes = (torch.arange(32) // 3 % 2).float().view(1, 1, 1, 32) if striped else torch.zeros(1, 1, 1, 32)
    return ((0.6 * col + 0.4 * stripes).clamp(0, 1) * 255).to(torch.uint8)


def test_judge_learns_provenance_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([_tiles(48, True, g), _tiles(48, False, g)])
    labels = ["striped"] * 48 + ["flat"] * 48
    judge, log = train_pool_judge(_Tiles(x), labels, JudgeTraining(epochs=6, batch_size=32, lr=3e-3))
    assert judge.classes == ["flat", "striped"] and log["steps"] == 18
    new = torch.cat([_tiles(32, True, g), _tiles(32, False, g)])  # tiles it never saw
    f, calls = judge.features_and_calls(new)
    assert f.shape == (64, 512) and f.dtype == torch.float64
    assert (calls == torch.tensor([1] * 32 + [0] * 32)).double().mean() > 0.9
    save_judge(judge, tmp_path / "j", {"note": 1})
    again, info = load_judge(tmp_path / "j")
    assert info["note"] == 1 and again.classes == ["flat", "striped"]
    assert torch.equal(again.features_and_calls(new[:8])[0], f[:8])


def test_judge_needs_two_classes():
    from hdlib.errors import DataError

    with pytest.raises(DataError, match="one provenance class"):
        train_pool_judge(_Tiles(torch.zeros(4, 3, 32, 32, dtype=torch.uint8)), ["a"] * 4)


def test_mixture_and_total_variation():
    assert np.allclose(mixture(torch.tensor([0, 0, 2, 2]), 3), [0.5, 0, 0.5])
    assert total_variation([0.5, 0, 0.5], [0.5, 0, 0.5]) == 0
    assert total_variation([1, 0], [0, 1]) == 1
    assert total_variation([0.5, 0.5, 0], [0.25, 0.25, 0.5]) == pytest.approx(0.5)


def test_copying_rate_tells_copies_from_new_draws():
    g = torch.Generator().manual_seed(0)
    train, unseen = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    copies = train + 0.01 * torch.randn(50, 8, generator=g)
    fresh = torch.randn(400, 8, generator=g)
    assert copying_rate(copies, train, unseen) == 1.0
    assert copying_rate(unseen, train, unseen) == 0.0
    assert 0.35 < copying_rate(fresh, train, unseen) < 0.65
    with pytest.raises(ValueError, match="equal"):
        copying_rate(fresh, train, unseen[:10])


def test_provenance_labels_name_class_for_procedural_tiles_and_source_otherwise(tmp_path):
    from hdlib.data.records import ImageRecord

    demo = D.build_demo_data(tmp_path / "demo", **TINY)
    f = sorted(demo.pool_dirs["procedural_pale"].glob("*.png"))[0]
    recs = [ImageRecord(str(f), None, "procedural_pale", None), ImageRecord(str(tmp_path / "x.png"), None, "he_x", "k")]
    assert provenance_labels(recs) == [f"procedural_pale:{D.pool_tile_class(f)}", "he_x"]

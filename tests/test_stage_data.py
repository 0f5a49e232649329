"""Stage 00 on a user's class-folder dataset: unreadable labeled images are skipped,
counted and listed up to data.max_bad_fraction; past it, a one-line error names the
first file; the user's files are never touched."""

import hashlib
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hdlib.config import load_config
from hdlib.errors import DataError
from hdlib.paths import StudyPaths
from hdlib.study.preparation import prepare_data
from hdlib.study.splits import fraction_indices, split_images

CLASSES = ["A", "B", "C"]


def _png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def dataset(tmp_path):
    for split, n in (("train", 12), ("test", 4)):
        for k, c in enumerate(CLASSES):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                _png(tmp_path / split / c / f"{c}_{i}.png", zlib.crc32(f"{split}{k}{i}".encode()))
    (tmp_path / "pool").mkdir()
    for i in range(30):
        _png(tmp_path / "pool" / f"p{i}.png", 10_000 + i)
    return tmp_path


def _cfg(root, *extra):
    return load_config(None, [
        "data.target=class_folders", f"data.train_path={root / 'train'}", f"data.test_path={root / 'test'}",
        f"data.classes={CLASSES}", "data.image_size=16", "data.val_fraction=0.25", "data.label_fractions=[0.5,1.0]",
        "data.pool_size=20", "data.pool_holdout=2", "downstream.fractions=[0.5]", "downstream.ratio_sweep=[]",
        f"data.pool_sources=[{{name: p, kind: folder, path: {root / 'pool'}}}]",
        f"study.results_root={root / 'results'}", "study.progress=false", *extra])


def _tree_hash(root):
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_bad_labeled_image_is_skipped_counted_and_listed(dataset):
    bad = dataset / "train" / "B" / "B_3.png"
    bad.write_bytes(b"not a png at all")
    before = _tree_hash(dataset / "train")
    cfg = _cfg(dataset, "data.max_bad_fraction=0.1")
    summary = prepare_data(cfg)
    paths = StudyPaths(cfg)
    unreadable = pd.read_csv(paths.manifest("unreadable"))
    assert list(unreadable["path"]) == [str(bad)]
    assert sum(summary["unreadable"].values()) == 1
    used = pd.concat([pd.read_csv(paths.manifest(s)) for s in ("target_train", "target_val")])
    assert str(bad) not in set(used["path"]) and len(used) == 3 * 12 - 1
    train = split_images(cfg, "target_train")  # streamed from the manifest, row for row
    assert len(train) == len(pd.read_csv(paths.manifest("target_train")))
    assert fraction_indices(cfg, 0.5).max() < len(train)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and 0 <= y < 3
    assert _tree_hash(dataset / "train") == before  # the user's data is never modified


def test_too_many_bad_labeled_images_is_one_line_error_naming_the_file(dataset):
    for i in (0, 1):
        (dataset / "train" / "A" / f"A_{i}.png").write_bytes(b"broken")
    with pytest.raises(DataError) as err:
        prepare_data(_cfg(dataset, "data.max_bad_fraction=0.01"))
    msg = str(err.value)
    assert "\n" not in msg and "A_" in msg and "max_bad_fraction" in msg

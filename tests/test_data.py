"""Data layer on tiny files in the real formats (class folders of .tif/.png,
MedMNIST .npz, large 'tissue' images with a blank region)."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hdlib import CRC_CLASSES
from hdlib.data.hashing import file_sha1
from hdlib.data.manifests import write_manifest
from hdlib.data.pixels import load_images, read_image
from hdlib.data.pool import PoolSource, build_pool
from hdlib.data.records import (
    ImageRecord,
    load_npz_dataset,
    scan_class_folders,
    scan_unlabeled_folder,
)
from hdlib.data.splits import (
    nested_label_fractions,
    stratified_split,
    stratified_subsample,
)
from hdlib.data.tiling import tile_large_image
from hdlib.errors import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # set per test, never at import: a count set
# while collecting would hold for every later module (the smoke study's bit-for-bit check among them)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _make_class_folders(root: Path, classes=CRC_CLASSES, per_class=3, size=12, seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            # Distinct images: the class index and item index are in the pixels.
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            arr[0, 0] = (c, i, 7)
            if i % 2 == 0:
                tifffile.imwrite(root / name / f"{name}-{i:03d}.tif", arr)
            else:
                Image.fromarray(arr).save(root / name / f"{name}-{i:03d}.png")
    (root / CRC_CLASSES[0] / ".hidden.png").write_bytes(b"not an image, must be ignored")
    return root


def _tissue_image(h=256, w=320, seed=1):
    """White background on the left 40%, pink noisy 'tissue' on the right."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, dtype=np.uint8)
    img += rng.integers(0, 6, size=img.shape, dtype=np.uint8)
    x0 = int(w * 0.4)
    tissue = np.stack([rng.integers(180, 230, (h, w - x0)), rng.integers(60, 120, (h, w - x0)),
                       rng.integers(140, 200, (h, w - x0))], axis=-1).astype(np.uint8)
    img[:, x0:] = tissue
    return img, x0


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    _make_class_folders(root / "nct")
    rng = np.random.default_rng(3)
    np.savez_compressed(root / "pathmnist.npz",
                        train_images=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8),
                        train_labels=(np.arange(30) % 3).reshape(-1, 1).astype(np.uint8),
                        test_images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8),
                        test_labels=np.array([0, 1, 2, 0, 1, 2]))
    img, _ = _tissue_image()
    tifffile.imwrite(root / "slide.tif", img)
    Image.fromarray(img).save(root / "slide.png")
    before = _tree_hashes(root)
    yield root
    # No operation in any test may change a source file.
    assert _tree_hashes(root) == before


# --------------------------------------------------------------------------- loaders
def test_scan_class_folders_crc(data_dir):
    records, classes = scan_class_folders(data_dir / "nct", classes=CRC_CLASSES)
    assert classes == list(CRC_CLASSES)
    assert len(records) == 9 * 3
    assert {Path(r.path).suffix for r in records} == {".tif", ".png"}
    assert not any(Path(r.path).name.startswith(".") for r in records)
    assert all(Path(r.path).parent.name == CRC_CLASSES[r.label] for r in records)
    assert records[0].source == "nct" and records[0].key == ""
    again, _ = scan_class_folders(data_dir / "nct", classes=CRC_CLASSES)
    assert again == records  # deterministic order
    discovered, found = scan_class_folders(data_dir / "nct")
    assert found == sorted(CRC_CLASSES) and len(discovered) == 27
    assert np.bincount([r.label for r in records]).tolist() == [3] * len(CRC_CLASSES)


def test_scan_class_folders_bad_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_class_folders(tmp_path / "nope")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DataError, match="empty_root"):
        scan_class_folders(tmp_path / "empty_root")
    root = _make_class_folders(tmp_path / "crc", classes=("ADI", "BACK"))
    with pytest.raises(DataError, match=r"missing class folder .*DEB"):
        scan_class_folders(root, classes=("ADI", "BACK", "DEB"))
    (root / "DEB").mkdir()
    (root / "DEB" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="class 'DEB' has no images"):
        scan_class_folders(root, classes=("ADI", "BACK", "DEB"))


def test_scan_unlabeled_folder(data_dir, tmp_path):
    records = scan_unlabeled_folder(data_dir / "nct", source="pool")
    assert len(records) == 27 and all(r.label is None and r.source == "pool" for r in records)
    (tmp_path / "blank").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan_unlabeled_folder(tmp_path / "blank")


def test_load_npz_dataset(data_dir):
    path = data_dir / "pathmnist.npz"
    records, classes = load_npz_dataset(path, "train", class_names=["ADI", "BACK", "DEB"])
    assert classes == ["ADI", "BACK", "DEB"] and len(records) == 30
    assert records[17].key == "npz:train:17" and records[17].label == 17 % 3
    images, kept, bad = load_images(records, 8, progress=False)
    with np.load(path) as npz:
        expected = torch.from_numpy(npz["train_images"]).permute(0, 3, 1, 2)
    assert not bad and torch.equal(images, expected)
    test_records, test_classes = load_npz_dataset(path, "test")
    assert test_classes == ["0", "1", "2"]
    gray, _, _ = load_images(test_records, 16, progress=False)  # grayscale -> RGB, resized
    assert gray.shape == (6, 3, 16, 16) and torch.equal(gray[:, 0], gray[:, 1])
    with pytest.raises(DataError, match=r"pathmnist\.npz.*'val_images'"):
        load_npz_dataset(path, "val")


def test_load_images_formats_and_resize(data_dir):
    records, _ = scan_class_folders(data_dir / "nct", classes=CRC_CLASSES)
    images, kept, bad = load_images(records, 12, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (27, 3, 12, 12) and kept == records
    # Same size: pixels pass through unchanged (tif via tifffile, png via PIL).
    assert torch.equal(images[0], torch.from_numpy(tifffile.imread(records[0].path)).permute(2, 0, 1))
    assert torch.equal(images[1], torch.from_numpy(np.array(Image.open(records[1].path))).permute(2, 0, 1))
    small, _, _ = load_images(records[:2], 6, progress=False)
    assert small.shape == (2, 3, 6, 6)
    # Area resize of a 12x12 image to 6x6 is the mean of 2x2 blocks.
    block = images[0].float().reshape(3, 6, 2, 6, 2).mean(dim=(2, 4))
    assert (small[0].float() - block).abs().max() <= 1


def test_grayscale_and_rgba_become_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgba = np.dstack([np.full((8, 8, 3), 100, np.uint8), np.full((8, 8), 10, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "g16.tif", gray.astype(np.uint16) * 257)
    recs = [ImageRecord(str(tmp_path / n), None, "x") for n in ("g.png", "a.png", "g16.tif")]
    images, _, _ = load_images(recs, 8, progress=False)
    assert torch.equal(images[0, 2], torch.from_numpy(gray))
    assert int(images[1].min()) == 100 == int(images[1].max())
    assert torch.equal(images[2, 1], torch.from_numpy(gray))


def test_corrupt_images_skipped_counted_and_thresholded(data_dir, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(data_dir / "nct", root)
    (root / "ADI" / "ADI-broken.png").write_bytes(b"\x89PNG garbage")
    (root / "BACK" / "BACK-broken.tif").write_bytes(b"II*\x00 truncated")
    records, classes = scan_class_folders(root, classes=CRC_CLASSES)
    assert len(records) == 29
    with pytest.warns(UserWarning, match="skipped 2 of 29"):
        images, kept, bad = load_images(records, 12, max_bad_fraction=0.1, progress=False)
    assert images.shape[0] == len(kept) == 27
    assert sorted(Path(r.path).name for r, _ in bad) == ["ADI-broken.png", "BACK-broken.tif"]
    assert all(reason for _, reason in bad)
    assert [r.path for r in kept] == [r.path for r in records if "broken" not in r.path]
    with pytest.raises(DataError, match=r"2 of 29 images unreadable.*ADI-broken\.png"):
        load_images(records, 12, max_bad_fraction=0.05, progress=False)
    with pytest.raises(DataError, match="ADI-broken"):
        load_images(records, 12, progress=False)  # default: no bad image allowed


# --------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("name", ["slide.tif", "slide.png"])
def test_tile_large_image_keeps_tissue_only(data_dir, name):
    path = data_dir / name
    _, x0 = _tissue_image()
    records = tile_large_image(path, tile_size=64, tissue_threshold=0.5)
    xs = sorted({int(r.key.split(":")[1].split(",")[0]) for r in records})
    # Grid x = 0,64,...,256; tissue starts at x0=128 -> tiles from 128 on (4 rows each).
    assert xs == [x for x in range(0, 257, 64) if x >= x0]
    assert len(records) == len(xs) * 4
    assert all(r.label is None and r.source == "slide" for r in records)
    loose = tile_large_image(path, tile_size=64, tissue_threshold=0.0)
    assert len(loose) == 5 * 4  # threshold 0 keeps the blank tiles as well
    some = tile_large_image(path, 64, stride=32, max_tiles=5, seed=1)
    assert len(some) == 5
    assert some == tile_large_image(path, 64, stride=32, max_tiles=5, seed=1)
    assert some != tile_large_image(path, 64, stride=32, max_tiles=5, seed=2)
    # Tiles decode to the slide's pixels (cropped, then resized).
    image = read_image(path)
    tiles, kept, bad = load_images(records[:3], 64, progress=False)
    x, y, s = (int(v) for v in records[0].key[5:].split(","))
    assert not bad and torch.equal(tiles[0], torch.from_numpy(image[y:y + s, x:x + s]).permute(2, 0, 1))
    assert load_images(records[:3], 32, progress=False)[0].shape == (3, 3, 32, 32)


def test_tile_large_image_largest_page_and_errors(tmp_path):
    img, _ = _tissue_image(128, 160)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:  # a small page first, the full-size one second
        tw.write(img[::4, ::4].copy())
        tw.write(img)
    assert read_image(path).shape == (128, 160, 3)
    assert len(tile_large_image(path, 32)) > 0
    with pytest.raises(DataError, match="smaller than tile_size"):
        tile_large_image(path, 512)
    with pytest.raises(DataError, match="does not exist"):
        tile_large_image(tmp_path / "none.svs", 32)


# --------------------------------------------------------------------------- pool
def test_build_pool_shares_and_determinism(data_dir):
    a = scan_unlabeled_folder(data_dir / "nct", source="a")           # 27 images
    b = tile_large_image(data_dir / "slide.png", 32, source="b")      # tiles
    target, _ = load_npz_dataset(data_dir / "pathmnist.npz", "train")
    sources = [PoolSource("a", a, 1.0), PoolSource("b", b, 3.0)]
    pool, summary = build_pool(sources, target, total=40, seed=0, progress=False)
    assert len(pool) == 40
    assert summary["sources"]["a"]["drawn"] == 10 and summary["sources"]["b"]["drawn"] == 30
    assert sum(r.source == "a" for r in pool) == 10
    assert len(set(pool)) == 40 and not summary["sources"]["a"]["with_replacement"]
    assert pool == build_pool(sources, target, 40, seed=0, progress=False)[0]
    assert pool != build_pool(sources, target, 40, seed=1, progress=False)[0]
    # A source smaller than its share: each image once, then with replacement.
    big, summary = build_pool([PoolSource("a", a, 1.0)], target, total=30, seed=0, progress=False)
    assert summary["sources"]["a"]["with_replacement"] and len(big) == 30 and set(big) == set(a)


def test_build_pool_excludes_target_by_hash(data_dir, tmp_path):
    target, _ = scan_class_folders(data_dir / "nct", classes=CRC_CLASSES)
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(pool_dir / f"p{i}.png")
    clean = scan_unlabeled_folder(pool_dir, source="tcga")
    pool, _ = build_pool([PoolSource("tcga", clean)], target, 4, seed=0, progress=False)
    assert len(pool) == 4
    # A target image copied into the pool under another name is caught.
    shutil.copy(target[5].path, pool_dir / "renamed_copy" f"{Path(target[5].path).suffix}")
    leaky = scan_unlabeled_folder(pool_dir, source="tcga")
    with pytest.raises(DataError, match=rf"'tcga'.*renamed_copy.*{Path(target[5].path).name}.*'nct'"):
        build_pool([PoolSource("tcga", leaky)], target, 2, seed=0, progress=False)
    # Sub-images: the same npz row is caught, a different split of the same file is not;
    # tiles of a slide the target tiles too are caught.
    npz = data_dir / "pathmnist.npz"
    copy = tmp_path / "copy.npz"
    shutil.copy(npz, copy)
    npz_target, _ = load_npz_dataset(npz, "train")
    with pytest.raises(DataError, match="npz:train:0"):
        build_pool([PoolSource("m", load_npz_dataset(copy, "train")[0])], npz_target, 3, 0, progress=False)
    ok, _ = build_pool([PoolSource("m", load_npz_dataset(copy, "test")[0])], npz_target, 3, 0, progress=False)
    assert len(ok) == 3
    tiles = tile_large_image(data_dir / "slide.tif", 32)
    with pytest.raises(DataError, match="tile:"):
        build_pool([PoolSource("s", tiles[10:])], tiles[:2], 3, 0, progress=False)


def test_build_pool_bad_input(data_dir):
    a = scan_unlabeled_folder(data_dir / "nct")
    with pytest.raises(DataError, match="'empty' has no images"):
        build_pool([PoolSource("a", a), PoolSource("empty", [])], [], 5, 0, progress=False)
    with pytest.raises(ValueError, match="weight"):
        PoolSource("neg", a, -1.0)


# --------------------------------------------------------------------------- splits
def _labels():
    return np.repeat(np.arange(4), [100, 60, 40, 20])


def test_stratified_split():
    labels = _labels()
    train, val = stratified_split(labels, 0.25, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [25, 15, 10, 5]
    assert np.array_equal(val, stratified_split(labels, 0.25, seed=0)[1])
    assert not np.array_equal(val, stratified_split(labels, 0.25, seed=1)[1])
    # Tiny classes: one each side; a single-image class cannot be split.
    _, v = stratified_split(np.array([0, 0, 1, 1, 1]), 0.01, seed=0)
    assert np.bincount(np.array([0, 0, 1, 1, 1])[v]).tolist() == [1, 1]
    with pytest.raises(DataError, match="class 'MUC' has 1 image"):
        stratified_split(np.array([0, 0, 0, 1]), 0.5, 0, class_names=["LYM", "MUC"])


def test_nested_label_fractions():
    labels = _labels()
    fracs = [0.05, 0.1, 0.5, 1.0]
    subsets = nested_label_fractions(labels, fracs, seed=0)
    assert np.bincount(labels[subsets[0.05]]).tolist() == [5, 3, 2, 1]
    assert np.bincount(labels[subsets[0.1]]).tolist() == [10, 6, 4, 2]
    assert len(subsets[1.0]) == len(labels)
    for small, large in zip(fracs, fracs[1:]):
        assert set(subsets[small]) < set(subsets[large])
    again = nested_label_fractions(labels, fracs, seed=0)
    other = nested_label_fractions(labels, fracs, seed=1)
    assert all(np.array_equal(subsets[f], again[f]) for f in fracs)
    assert not np.array_equal(subsets[0.1], other[0.1])
    with pytest.raises(DataError, match=r"0\.01 leaves class 'STR'"):
        nested_label_fractions(labels, [0.01], seed=0, class_names=["ADI", "BACK", "STR", "TUM"])


def test_stratified_subsample():
    labels = _labels()
    idx = stratified_subsample(labels, 22, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 6, 4, 2]
    assert np.array_equal(idx, stratified_subsample(labels, 22, seed=0))


# --------------------------------------------------------------------------- manifest
def test_manifest_lists_every_record_with_its_file_hash(data_dir, tmp_path):
    import pandas as pd

    records, classes = scan_class_folders(data_dir / "nct", classes=CRC_CLASSES)
    tiles = tile_large_image(data_dir / "slide.tif", 64)  # unlabeled sub-images of one file
    all_records = records + tiles
    manifest = tmp_path / "out" / "manifest.csv"
    write_manifest(all_records, manifest, classes=classes,
                   extra_columns={"split": ["train"] * len(all_records)}, progress=False)
    assert not [p for p in manifest.parent.iterdir() if p.name != "manifest.csv"]  # no temp left over
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["path", "key", "label", "class_name", "source", "sha1", "split"]
    for column in ("path", "key", "source"):
        assert list(frame[column]) == [getattr(r, column) for r in all_records]
    assert list(frame["label"]) == [str(r.label) for r in records] + [""] * len(tiles)
    assert list(frame["class_name"]) == [CRC_CLASSES[r.label] for r in records] + [""] * len(tiles)
    assert list(frame["sha1"]) == [file_sha1(r.path) for r in all_records]
    assert (frame["split"] == "train").all()
    with pytest.raises(ValueError, match="clashes"):
        write_manifest(records, tmp_path / "m.csv", extra_columns={"sha1": [""] * len(records)}, progress=False)
    with pytest.raises(ValueError, match="has 1 values"):
        write_manifest(records, tmp_path / "m.csv", extra_columns={"split": ["train"]}, progress=False)
    with pytest.raises(DataError, match="label 9 is not one of"):
        write_manifest([ImageRecord(records[0].path, 9, "s")], tmp_path / "m.csv", classes=classes, progress=False)
    assert not (tmp_path / "m.csv").exists()


def test_load_images_keeps_input_order_and_decodes_each_slide_once(data_dir, monkeypatch):
    import hdlib.data.pixels as data

    tiles = tile_large_image(data_dir / "slide.tif", 32) + tile_large_image(data_dir / "slide.png", 32)
    records = [tiles[i] for i in np.random.default_rng(0).permutation(len(tiles))]  # interleaved files
    calls = []
    real = data.read_image
    monkeypatch.setattr(data, "read_image", lambda p: calls.append(str(p)) or real(p))
    images, kept, bad = load_images(records, 16, cache_size=1, progress=False)
    assert kept == records and not bad
    assert sorted(calls) == sorted({r.path for r in records})  # one decode per file
    for j in (0, 7, len(records) - 1):
        assert torch.equal(images[j], load_images([records[j]], 16, progress=False)[0][0])

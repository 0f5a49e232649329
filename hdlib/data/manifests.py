"""Manifests: the CSV index of a set of records (path, key, label, class_name,
source, sha1 [+ extra columns]), written atomically and read back as records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..errors import DataError
from ..io import atomic_write_csv
from .hashing import file_sha1
from .records import ImageRecord

MANIFEST_COLUMNS = ("path", "key", "label", "class_name", "source", "sha1")


def write_manifest(records: Sequence[ImageRecord], path, classes: Sequence[str] | None = None,
                   extra_columns: Mapping[str, Sequence] | None = None, progress: bool = True) -> None:
    """CSV (path, key, label, class_name, source, sha1 [+ extra columns]) written
    atomically; sha1 is of the file's bytes, so a later change to a file can be detected."""
    extra = dict(extra_columns or {})
    for name, values in extra.items():
        if name in MANIFEST_COLUMNS:
            raise ValueError(f"extra column {name!r} clashes with a manifest column")
        if len(values) != len(records):
            raise ValueError(f"extra column {name!r} has {len(values)} values for {len(records)} records")
    rows = []
    for rec in tqdm(records, desc="hash manifest", disable=not progress, leave=False):
        name = ""
        if rec.label is not None and classes is not None:
            if not 0 <= rec.label < len(classes):
                raise DataError(f"{rec.record_id}: label {rec.label} is not one of {len(classes)} classes")
            name = classes[rec.label]
        rows.append({"path": rec.path, "key": rec.key, "label": rec.label, "class_name": name,
                     "source": rec.source, "sha1": file_sha1(rec.path)})
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    frame["label"] = frame["label"].astype("Int64")
    for name, values in extra.items():
        frame[name] = list(values)
    atomic_write_csv(frame, path)


def records_from_manifest(manifest: str | Path | pd.DataFrame) -> list[ImageRecord]:
    """The records of a manifest (a CSV file or its DataFrame), in row order."""
    df = pd.read_csv(manifest, keep_default_na=False) if not isinstance(manifest, pd.DataFrame) else manifest
    labels = pd.to_numeric(df["label"], errors="coerce") if "label" in df else pd.Series([np.nan] * len(df))
    keys = df["key"].fillna("") if "key" in df else [""] * len(df)
    return [ImageRecord(str(p), None if pd.isna(lb) else int(lb), str(src), str(k))
            for p, lb, src, k in zip(df["path"], labels, df.get("source", [""] * len(df)), keys)]

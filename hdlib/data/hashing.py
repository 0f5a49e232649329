"""Content hashes, used to keep the labeled target out of the pool and to detect a
changed file behind a manifest row:
  * whole files: sha1 of the file bytes (`file_sha1`);
  * sub-images: sha1 of "<file sha1>|<key>" (`record_content_hash`), i.e. the
    same row / tile of a byte-identical file, whatever the file is called.
    Decoded pixels are not hashed (that would mean decoding every pool image);
    a re-encoded copy of a target image is therefore not caught.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import DataError
from .records import ImageRecord

_SHA1_CACHE: dict[tuple, str] = {}


def file_sha1(path) -> str:
    """sha1 of the file's bytes; cached per (path, size, mtime, inode) so a changed
    file is hashed again."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise DataError(f"file does not exist: {path}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA1_CACHE:
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA1_CACHE[key] = digest.hexdigest()
    return _SHA1_CACHE[key]


def record_content_hash(rec: ImageRecord) -> str:
    """File sha1 for whole files; sha1("<file sha1>|<key>") for sub-images."""
    h = file_sha1(rec.path)
    return h if not rec.key else hashlib.sha1(f"{h}|{rec.key}".encode()).hexdigest()

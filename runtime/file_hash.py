"""sha256 of a file, read in chunks: the one file hash of bundles, manifests and provenance."""
from __future__ import annotations

import hashlib
import os

CHUNK_BYTES = 8 * 1024**2


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the file's bytes (what `sha256sum FILE` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()

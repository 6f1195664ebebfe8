"""Content hashes: one chunked sha256 for shard tars, weight files, downloads and table inputs; one hash of JSON data
(configs, plans, operations)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO

#: Bytes read per chunk (4 MiB: large enough for object-store reads, small enough for memory).
CHUNK = 1 << 22


def stream_sha256(f: IO[bytes]) -> str:
    """Hex sha256 of what remains in the binary file object ``f`` (local file or fsspec file), read in chunks."""
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the local file ``path``."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def json_sha256(obj) -> str:
    """Hex sha256 of ``obj``'s canonical JSON (sorted keys, default separators): the same data, the same hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

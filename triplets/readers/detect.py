"""Which format an input path is (``input_format: auto``), from its shape: what exists is checked first, so a
folder named ``photos.tar`` or ``a{1}`` is a folder.

* a folder with images → ``folder``; without images but with ``.tar`` files → ``webdataset``; with neither but
  with ``.parquet``/``.csv``/``.jsonl`` files → ``table`` (or ``pickapic`` when its first parquet file has
  Pick-a-Pic v1's columns);
* a file: ``.json`` → ``coco``, ``.tar`` → ``webdataset``, ``.csv``/``.jsonl`` → ``table``, ``.parquet`` →
  ``table`` or ``pickapic``;
* a brace pattern → ``webdataset``; a glob of table files → ``table``/``pickapic``.
"""

from __future__ import annotations

from pathlib import Path

from cnc.base.location import is_url, resolve
from triplets.readers.base import IMAGE_EXTENSIONS, TABLE_SUFFIXES, InputError, has_glob
from triplets.readers.pickapic import SIGNATURE_COLUMNS


def _parquet_kind(path: str) -> str:
    """``table`` unless the parquet file has Pick-a-Pic v1's columns (or is unreadable: the Pick-a-Pic reader then
    reports why)."""
    try:
        import pyarrow.parquet as pq  # heavy optional import: only parquet inputs need it

        with resolve(path).open("rb") as f:
            names = set(pq.ParquetFile(f).schema_arrow.names)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader, with its reason
        return "pickapic"
    return "pickapic" if all(c in names for c in SIGNATURE_COLUMNS) else "table"


def _tables_kind(names: list[str]) -> str | None:
    """``table`` / ``pickapic`` for a listing holding table files (the first parquet decides), else ``None``."""
    tables = sorted(n for n in names if n.lower().endswith(TABLE_SUFFIXES))
    if not tables:
        return None
    parquet = next((n for n in tables if n.lower().endswith(".parquet")), None)
    return _parquet_kind(parquet) if parquet else "table"


def _file_kind(path: str, name: str) -> str:
    lower = name.lower()
    if lower.endswith(".parquet"):
        return _parquet_kind(path)  # Pick-a-Pic v1 (triplets.readers.pickapic) or a generic table
    if lower.endswith((".csv", ".jsonl")):
        return "table"
    if lower.endswith(".json"):
        return "coco"
    if lower.endswith(".tar"):
        return "webdataset"
    raise InputError(f"input {path!r} is a file but neither a COCO .json nor a .tar")


def _listing_kind(names: list[str], table_names: list[str]) -> str:
    has_images = any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names)
    if not has_images and any(n.endswith(".tar") for n in names):
        return "webdataset"
    if not has_images:
        return _tables_kind(table_names) or "folder"
    return "folder"


def detect_format(path: str) -> str:
    """``folder`` | ``coco`` | ``webdataset`` | ``table`` | ``pickapic`` from the shape of ``path`` (module docstring).

    Raises:
        InputError: ``path`` is none of these (missing, or a file of another kind).
    """
    if is_url(path):
        return _detect_remote(path)
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        has_images = any(f.suffix.lower() in IMAGE_EXTENSIONS for f in files)
        if not has_images and any(t.is_file() for t in p.glob("*.tar")):
            return "webdataset"
        if not has_images:
            return _tables_kind([str(f) for f in files]) or "folder"
        return "folder"
    if p.is_file():
        return _file_kind(path, p.name)
    if "{" in path and "}" in path:
        return "webdataset"
    if has_glob(path) and path.lower().endswith(TABLE_SUFFIXES):
        matches = sorted(str(m) for m in Path(path).parent.glob(Path(path).name)) if "/" in path else []
        return _tables_kind(matches) or "table"
    raise InputError(f"input {path!r} does not exist or is not a folder, a COCO .json, a .tar/brace pattern or "
                     f"a table (.parquet/.csv/.jsonl)")


def _detect_remote(url: str) -> str:
    loc = resolve(url)
    if has_glob(loc.path) and url.lower().endswith(TABLE_SUFFIXES):
        return _tables_kind([loc.fs.unstrip_protocol(p) for p in loc.fs.glob(loc.path)]) or "table"
    if loc.isdir():
        found = loc.fs.find(loc.path)
        return _listing_kind([p.rsplit("/", 1)[-1] for p in found], [loc.fs.unstrip_protocol(p) for p in found])
    if loc.isfile():
        return _file_kind(url, loc.name)
    if "{" in url and "}" in url:
        return "webdataset"
    raise InputError(f"input {url!r} does not exist or is not a folder, a COCO .json or a .tar/brace pattern")

"""Pick-a-Pic v1 input (``input_format: pickapic``): the ``yuvalkirstain/pickapic_v1`` parquet files.

Input path: one ``.parquet`` file, a folder of them, a glob, or the same as an fsspec URL (``s3://bucket/pickapic/``,
``hf://datasets/yuvalkirstain/pickapic_v1/data/``...). Files are read in sorted name order. Each row is a pair of
generated images for one prompt; the reference's rules (``data/parse_pickapic.py``) are applied in its order:

1. caption = the prompt with every ``:`` removed (nothing else changed);
2. drop the row when the caption has fewer than 3 whitespace-separated words, or when any of its lower-cased words
   is in the stop-list (exact word match);
3. keep the preferred image: ``jpg_0`` if ``label_0 > label_1``, else ``jpg_1`` (**ties -> image 1**);
4. de-duplicate by the kept image's uid (``image_0_uid`` / ``image_1_uid``): the first row wins.

Items are the plain dicts of :mod:`triplets.readers.base`: ``key`` = the image uid (the reference's file name),
``caption``, no dataset mask, and ``source`` in the **parquet cell scheme** ``PARQUET#COLUMN/ROW``
(``/data/train-00000-of-00100.parquet#jpg_1/1234``: the bytes in column ``COLUMN`` of row ``ROW``, 0-based within the
file), which :func:`read_parquet_cell` reads (:func:`triplets.readers.read_source_bytes` dispatches to it).

Stop-list: the reference's list (``triplets/data/pickapic_stopwords.txt``) unless a ``stopwords.txt`` lies beside the
parquet files (in the input folder, or the folder of the file / glob), which then replaces it (an empty file turns the
filter off); :func:`read_pickapic` also takes an explicit file. Dropped rows are counted and logged per reason.

Reading cost: the plan is sorted by key (uid, random), so the load stage reads cells in random file order; each read
loads one row group of one image column (cached, a few at a time). Parquet files with small row groups read faster.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import re
from collections import Counter
from pathlib import Path

from triplets.readers.base import InputError, InputFormat, ItemWarnings, ReadOptions
from triplets.sample import make_key

log = logging.getLogger(__name__)

#: The reference's stop-list, shipped with the package.
DEFAULT_STOPWORDS = Path(__file__).parent.parent / "data" / "pickapic_stopwords.txt"
SIDECAR_STOPWORDS = "stopwords.txt"
MIN_WORDS = 3
_CELL = re.compile(r"(?P<file>.+\.parquet)#(?P<column>[A-Za-z0-9_]+)/(?P<row>\d+)")
_COLUMNS = ["caption", "label_0", "label_1", "image_0_uid", "image_1_uid"]
#: Columns that make a parquet file a Pick-a-Pic v1 file rather than a generic table (format detection).
SIGNATURE_COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1")


class PickapicInputError(InputError):
    """The input is not readable as Pick-a-Pic parquet files."""


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def list_parquet_files(path: str) -> tuple[list[str], str]:
    """``(sorted parquet URLs, folder holding them)`` for a file, folder or glob (local or fsspec URL)."""
    fs, root = _fs(path)
    if any(c in root for c in "*?["):
        files, folder = sorted(fs.glob(root)), posixpath.dirname(root)
    elif fs.isdir(root):
        files, folder = sorted(fs.glob(posixpath.join(root.rstrip("/"), "*.parquet"))), root
    elif fs.isfile(root):
        files, folder = [root], posixpath.dirname(root)
    else:
        raise PickapicInputError(f"Pick-a-Pic input {path!r} does not exist")
    files = [f for f in files if f.endswith(".parquet")]
    if not files:
        raise PickapicInputError(f"no .parquet files in {path!r}")
    return [fs.unstrip_protocol(f) if "://" in path else f for f in files], (
        fs.unstrip_protocol(folder) if "://" in path else folder)


def load_stopwords(path: str | Path | None = None) -> frozenset[str]:
    """Lower-cased words of a stop-word file (one per line, ``#`` comments); ``None`` = the reference's list."""
    import fsspec

    with fsspec.open(str(path or DEFAULT_STOPWORDS), "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    return frozenset(w.strip().lower() for w in (ln.split("#", 1)[0] for ln in lines) if w.strip())


def _find_stopwords(folder: str) -> str | None:
    fs, root = _fs(folder)
    sidecar = posixpath.join(root, SIDECAR_STOPWORDS)
    return (fs.unstrip_protocol(sidecar) if "://" in folder else sidecar) if fs.isfile(sidecar) else None


def keep_caption(caption: str, stopwords: frozenset[str]) -> str | None:
    """The reference's caption rule: ``:`` removed; ``None`` (drop) for < 3 words or any stop word."""
    caption = caption.replace(":", "")
    words = caption.split()
    if len(words) < MIN_WORDS or stopwords.intersection(caption.lower().split()):
        return None
    return caption


def preferred_image(label_0: float, label_1: float) -> int:
    """0 when image 0 is preferred (``label_0 > label_1``), else 1 (ties -> image 1, as the reference)."""
    return 0 if label_0 > label_1 else 1


def read_pickapic(path: str, stopwords: str | Path | None = None) -> list[dict]:
    """Reader items of Pick-a-Pic parquet file(s) after the reference's rules (module docstring); unsorted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files, folder = list_parquet_files(path)
    stop_file = stopwords or _find_stopwords(folder)
    words = load_stopwords(stop_file)
    log.info("Pick-a-Pic stop-list: %s (%d words)", stop_file or "reference list", len(words))
    items, seen, dropped = [], set(), Counter()
    for url in files:
        fs, p = _fs(url)
        try:
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                missing = [c for c in _COLUMNS if c not in pf.schema_arrow.names]
                if missing:
                    raise PickapicInputError(f"{url} is not a Pick-a-Pic v1 parquet file (missing columns {missing})")
                table = pf.read(columns=_COLUMNS).to_pydict()
        except (pa.ArrowException, OSError) as err:
            raise PickapicInputError(f"{url} is not a readable parquet file: {err}") from None
        for row, (cap, l0, l1, u0, u1) in enumerate(zip(*(table[c] for c in _COLUMNS))):
            caption = keep_caption(cap, words) if isinstance(cap, str) else None
            if caption is None:
                dropped["caption filtered (< 3 words, stop word or missing)"] += 1
                continue
            if l0 is None or l1 is None:
                dropped["no preference label"] += 1
                continue
            k = preferred_image(l0, l1)
            uid = str(u0 if k == 0 else u1)
            if uid in seen:
                dropped["duplicate image uid"] += 1
                continue
            seen.add(uid)
            items.append({"key": make_key(uid), "source": f"{url}#jpg_{k}/{row}", "caption": caption,
                          "mask_path": None, "mask_kind": None})
    for reason, n in sorted(dropped.items()):
        log.info("Pick-a-Pic: %d rows dropped: %s", n, reason)
    return items


@functools.lru_cache(maxsize=64)
def _row_groups(url: str) -> tuple[int, ...]:
    """Cumulative row counts at the start of each row group of ``url``."""
    import pyarrow.parquet as pq

    fs, p = _fs(url)
    with fs.open(p, "rb") as f:
        md = pq.ParquetFile(f).metadata
    starts, total = [], 0
    for i in range(md.num_row_groups):
        starts.append(total)
        total += md.row_group(i).num_rows
    return (*starts, total)


@functools.lru_cache(maxsize=4)
def _row_group_column(url: str, group: int, column: str):
    import pyarrow.parquet as pq

    fs, p = _fs(url)
    with fs.open(p, "rb") as f:
        return pq.ParquetFile(f).read_row_group(group, columns=[column]).column(0)


def read_parquet_cell(source: str) -> bytes:
    """Bytes of a ``PARQUET#COLUMN/ROW`` source (see the module docstring).

    Raises:
        OSError: malformed reference, missing file, column or row, or a cell without bytes (a per-item failure).
    """
    m = _CELL.fullmatch(source)
    if m is None:
        raise OSError(f"not a PARQUET#COLUMN/ROW reference: {source!r}")
    url, column, row = m["file"], m["column"], int(m["row"])
    try:
        starts = _row_groups(url)
        if not 0 <= row < starts[-1]:
            raise OSError(f"row {row} out of range (file has {starts[-1]} rows)")
        group = max(i for i, s in enumerate(starts[:-1]) if s <= row)
        value = _row_group_column(url, group, column)[row - starts[group]].as_py()
    except (KeyError, ValueError) as err:  # pyarrow: unknown column / unreadable file
        raise OSError(f"{source}: {err}") from None
    if isinstance(value, dict):  # datasets' Image feature stores {"bytes", "path"}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise OSError(f"{source}: the cell holds no image bytes")
    return bytes(value)


def is_cell_source(source: str) -> bool:
    """Whether ``source`` is a ``PARQUET#COLUMN/ROW`` reference."""
    return "#" in source and source.split("#", 1)[0].endswith(".parquet")


class PickapicFormat(InputFormat):
    """Pick-a-Pic v1 parquet files (module docstring); planned as an item list (the reference's rules need every
    row: de-duplication is global)."""

    name = "pickapic"

    def list_items(self, path: str, warn: ItemWarnings, options: ReadOptions) -> list[dict]:
        return read_pickapic(path)


FORMAT = PickapicFormat()

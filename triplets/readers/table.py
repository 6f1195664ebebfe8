"""Table inputs (``input_format: table``): parquet, CSV or JSONL files with one row per image.

The input is one table file, a folder of them (all ``.parquet``/``.csv``/``.jsonl`` files below it, sorted) or a
glob (``s3://bucket/laion/*.parquet``), local or on any fsspec filesystem. Columns (names configurable under
``table:``, img2dataset's conventions by default):

* ``url`` (``table.image_column``): the image, as a path or a URL (``s3://``, ``gs://``, ``https://``...); a
  relative path is relative to the table file's folder;
* ``caption`` (``table.caption_column``): the caption (missing or null = empty caption);
* ``key`` (``table.key_column``, optional): the sample key; without that column the key is
  ``<file stem>/<row, 9 digits>``, unique by construction (with it, keys must be unique over the input);
* ``table.mask_column`` (optional, off by default): a binary dataset mask, path or URL.

Planning never reads the rows (:class:`TableInput`): it lists the files, fingerprints each (size + etag or mtime,
optionally a sha256 of the content) and counts its rows (parquet: the footer; CSV: a streaming pyarrow read; JSONL:
newline count), so a plan costs O(files + shards). Workers read only their row range (:func:`read_rows`): parquet by
row group, CSV/JSONL by streaming from the start of the file (keep those files small, or use parquet).
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cnc.base import jsonio
from cnc.base.location import Location, is_url, resolve
from triplets.readers.base import (
    TABLE_SUFFIXES,
    InputError,
    InputFormat,
    ItemWarnings,
    PlannedInput,
    ReadOptions,
    TableColumns,
    Where,
    file_identity,
    has_glob,
)
from triplets.sample import make_key

log = logging.getLogger(__name__)
#: Parallel metadata requests while planning (footers, sizes: latency bound on object stores).
PLAN_THREADS = 16


class TableInputError(InputError):
    """The table input cannot be planned (missing files or columns, unreadable table)."""


def is_table_name(name: str) -> bool:
    return name.lower().endswith(TABLE_SUFFIXES)


def _kind(url: str) -> str:
    return posixpath.splitext(url.lower())[1].lstrip(".")


def list_table_files(path: str) -> list[Location]:
    """The table files of a file, folder (recursive) or glob, sorted by URL.

    Raises:
        TableInputError: nothing matches, or no table file is there.
    """
    loc = resolve(path)
    if any(c in loc.path for c in "*?["):
        files = [Location(loc._url_of(p), loc.fs, p) for p in sorted(loc.fs.glob(loc.path))]
    elif loc.isdir():
        base = loc.path.rstrip("/")
        files = [Location(loc._url_of(p), loc.fs, p) for p in sorted(loc.fs.find(base))]
    elif loc.isfile():
        files = [loc]
    else:
        raise TableInputError(f"table input {path!r} does not exist")
    files = [f for f in files if is_table_name(f.name)]
    if not files:
        raise TableInputError(f"no .parquet, .csv or .jsonl files in {path!r}")
    return files


def _columns_of(loc: Location) -> tuple[list[str], int]:
    """``(column names, row count)`` of one table file from metadata (parquet footer) or one streaming pass."""
    kind = _kind(loc.name)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with loc.open("rb") as f:
            md = pq.ParquetFile(f)
            return list(md.schema_arrow.names), md.metadata.num_rows
    if kind == "csv":
        import pyarrow.csv as pcsv

        with loc.open("rb") as f:
            reader = pcsv.open_csv(f)
            names = list(reader.schema.names)
            return names, sum(batch.num_rows for batch in reader)
    rows, first, last = 0, None, b"\n"
    with loc.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            if first is None:
                first = chunk.split(b"\n", 1)[0]
            rows += chunk.count(b"\n")
            last = chunk
    if last and not last.endswith(b"\n"):
        rows += 1  # last line without a newline
    try:
        head = jsonio.loads(first, what="JSONL row") if first else {}
    except ValueError:  # not JSON, not UTF-8, nested too deep (jsonio)
        raise TableInputError(f"{loc.url}: the first line is not a JSON object") from None
    return (list(head) if isinstance(head, dict) else []), rows


@dataclass
class TableFile:
    """One planned table file: its identity and row count."""

    identity: dict
    rows: int


class TableInput:
    """The files of a table input with their identities and row counts (metadata only; module docstring).

    Args:
        path: file, folder or glob (local or fsspec URL).
        columns: the configured column names (image and caption must exist in every file).
        content_hash: also hash every file's content (slow: reads every byte once).
    """

    def __init__(self, path: str, columns: TableColumns, content_hash: bool = False):
        self.path, self.columns = path, columns
        locs = list_table_files(path)
        with ThreadPoolExecutor(min(PLAN_THREADS, len(locs))) as pool:
            self.files: list[TableFile] = list(pool.map(lambda loc: self._plan_file(loc, content_hash), locs))
        self.num_rows = sum(f.rows for f in self.files)
        if not self.num_rows:
            raise TableInputError(f"table input {path!r} holds no rows")
        log.info("table input %s: %d rows in %d file(s)", path, self.num_rows, len(self.files))

    def _plan_file(self, loc: Location, content_hash: bool) -> TableFile:
        try:
            names, rows = _columns_of(loc)
            identity = file_identity(loc, content_hash)
        except TableInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow/fsspec raise many kinds for an unreadable file
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TableInputError(f"{loc.url} is not a readable {_kind(loc.name)} table: {text}") from None
        required = [self.columns.image, self.columns.caption]
        missing = [c for c in required if c not in names] if rows else []
        if missing:
            raise TableInputError(f"{loc.url} has no column(s) {missing} (missing columns; found {names[:8]}); "
                                  f"set table.image_column / table.caption_column")
        if self.columns.mask and rows and self.columns.mask not in names:
            raise TableInputError(f"{loc.url} has no mask column {self.columns.mask!r} (table.mask_column)")
        return TableFile(identity, rows)


# -- worker side: the items of one row range ---------------------------------------------------------------
def _parquet_rows(loc: Location, start: int, stop: int, cols: list[str]) -> dict[str, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with loc.open("rb") as f:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        cols = [c for c in cols if c in pf.schema_arrow.names]
        groups, first, pos = [], None, 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if pos + n > start and pos < stop:
                groups.append(g)
                first = pos if first is None else first
            pos += n
        if not groups:
            return {c: [] for c in cols}
        table = pa.concat_tables([pf.read_row_group(g, columns=cols) for g in groups])
    return table.slice(start - first, stop - start).to_pydict()


def _stream_rows(loc: Location, start: int, stop: int, cols: list[str]) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in cols}
    if _kind(loc.name) == "csv":
        import pyarrow as pa
        import pyarrow.csv as pcsv

        pos = 0
        # every column as text: keys such as 000000012 keep their zeros
        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in cols}, strings_can_be_null=True)
        with loc.open("rb") as f:
            for batch in pcsv.open_csv(f, convert_options=convert):
                n = batch.num_rows
                if pos + n > start:
                    part = batch.slice(max(0, start - pos), min(stop, pos + n) - max(start, pos)).to_pydict()
                    for c in cols:
                        out[c] += part.get(c, [None] * len(next(iter(part.values()), [])))
                pos += n
                if pos >= stop:
                    break
        return out
    with loc.open("rb") as f:
        for n, line in enumerate(f):
            if n >= stop:
                break
            if n < start:
                continue
            try:
                row = jsonio.loads(line, what="JSONL row")
            except ValueError:  # not JSON, not UTF-8, too big or too deep (jsonio): an empty row
                row = None
            row = row if isinstance(row, dict) else {}
            for c in cols:
                out[c].append(row.get(c))
    return out


def _source(value, folder: Location) -> str:
    """A path or URL cell as a source: relative paths are relative to the table's folder."""
    if not isinstance(value, str) or not value.strip():
        return ""
    value = value.strip()
    if is_url(value) or value.startswith("/"):
        return value
    return folder.child(*value.split("/")).url


def read_rows(url: str, start: int, stop: int, columns: TableColumns) -> list[dict]:
    """Reader items (:mod:`triplets.readers.base`) of rows ``[start, stop)`` of one table file, in row order.

    A row without an image gets an empty ``source`` (it fails per item in the load stage).

    Raises:
        OSError: the file cannot be read any more (the shard fails and is retried).
    """
    loc = resolve(url)
    cols = [columns.image, columns.caption, columns.key] + ([columns.mask] if columns.mask else [])
    rows = _parquet_rows(loc, start, stop, cols) if _kind(loc.name) == "parquet" else _stream_rows(loc, start, stop,
                                                                                                  cols)
    n = stop - start
    images = rows.get(columns.image) or [None] * n
    if len(images) != n:
        raise OSError(f"{url}: rows {start}..{stop} planned, {len(images)} read (the file changed?)")
    captions = rows.get(columns.caption) or [None] * n
    keys = rows.get(columns.key) or [None] * n
    masks = rows.get(columns.mask) if columns.mask else None
    folder, stem = loc.parent, posixpath.splitext(loc.name)[0]
    items = []
    for i in range(n):
        key = keys[i]
        key = make_key(str(key)) if key is not None and str(key).strip() else make_key(f"{stem}/{start + i:09d}")
        mask = _source(masks[i], folder) if masks is not None else ""
        caption = captions[i]
        items.append({"key": key, "source": _source(images[i], folder),
                      "caption": caption.strip() if isinstance(caption, str) else "",
                      "mask_path": mask or None, "mask_kind": "binary" if mask else None})
    return items


class TableFormat(InputFormat):
    """Table files (module docstring); planned by row ranges from metadata, never listed item by item."""

    name = "table"
    range_suffixes = TABLE_SUFFIXES

    def check_shape(self, path: str) -> None:
        p = Where(path)
        if not (p.is_dir() or (p.is_file() and p.suffix.lower() in TABLE_SUFFIXES) or has_glob(path)):
            raise InputError(f"input_format=table needs a .parquet/.csv/.jsonl file, a folder or a glob of them, "
                             f"{path!r} is none of these")

    def list_items(self, path: str, warn: ItemWarnings, options: ReadOptions) -> list[dict]:
        """Every row as items (small tables only: builds plan tables by row range, :meth:`plan`)."""
        table = TableInput(path, options.columns)
        return [it for f in table.files for it in read_rows(f.identity["url"], 0, f.rows, options.columns)]

    def plan(self, path: str, options: ReadOptions, item_lists: bool = False) -> PlannedInput:
        table = TableInput(path, options.columns, content_hash=options.content_hash)
        return PlannedInput(files=[{**f.identity, "rows": f.rows} for f in table.files])

    def range_items(self, url: str, start: int, stop: int, options: ReadOptions) -> list[dict]:
        return read_rows(url, start, stop, options.columns)


FORMAT = TableFormat()

"""Input readers, one module per format: listing, planning and reading of every input the build takes.

==================  ====================================================================================
module              owns
==================  ====================================================================================
``base``            the item record, :class:`InputFormat` (the contract every format implements),
                    :class:`ReadOptions`, :class:`InputError`, per-item warnings, input-file identities
``detect``          ``input_format: auto``: which format a path is
``folder``          a folder of images (captions files / sidecar ``.txt``, ``masks/``); local or remote
``coco``            a COCO captions JSON (+ COCO-Stuff masks); local or remote
``webdataset``      ``.tar`` files, brace patterns, folders of tars; ``TAR#MEMBER`` sources; planned by ranges
``pickapic``        Pick-a-Pic v1 parquet files with the reference's rules; ``PARQUET#COLUMN/ROW`` sources
``table``           parquet/CSV/JSONL tables (a file, folder or glob), planned by row ranges from metadata
==================  ====================================================================================

Entry points: :func:`read_items` (every item of an input, sorted), :func:`plan_input` (what the planner splits into
shards: items, or row ranges of input files), :func:`shard_items` (a planned shard's items, read by the worker),
:func:`read_source_bytes` (one item's image bytes, read by the load stage). Every input may live on object storage
(``s3://``, ``gs://``, any fsspec filesystem): the driver lists it (no download of images) and the workers read each
source directly.
"""

from __future__ import annotations

from cnc.base.errors import UserError
from cnc.base.location import is_url, resolve
from triplets.readers import coco, folder, pickapic, table, webdataset
from triplets.readers.base import (
    FORMATS,
    IMAGE_EXTENSIONS,
    TABLE_SUFFIXES,
    InputError,
    InputFormat,
    PlannedInput,
    ReadOptions,
    TableColumns,
    checked_items,
    same_file,
)
from triplets.readers.detect import detect_format

#: Format name → its reader (the registry ``input_format`` selects from).
READERS: dict[str, InputFormat] = {f.name: f for f in (folder.FORMAT, coco.FORMAT, webdataset.FORMAT,
                                                      pickapic.FORMAT, table.FORMAT)}


def get_reader(fmt: str) -> InputFormat:
    """The reader of format ``fmt``.

    Raises:
        InputError: unknown format name.
    """
    try:
        return READERS[fmt]
    except KeyError:
        raise InputError(f"unknown input format {fmt!r}; valid: {', '.join(FORMATS)}") from None


def check_input_shape(path: str, fmt: str) -> None:
    """Refuse a forced ``input_format`` that does not fit what ``path`` is (``coco`` on a folder...)."""
    get_reader(fmt).check_shape(path)


def read_items(path: str, input_format: str = "auto", *, allow_outside_input: bool = False,
               options: ReadOptions | None = None) -> list[dict]:
    """All source items of ``path``, sorted by key.

    Items that cannot be used (non-UTF-8 names, links outside the input...) are skipped with a warning each.

    Args:
        allow_outside_input: follow symlinks and COCO ``file_name`` values that point outside the input root
            (refused per item by default).
        options: reader options (table columns...); overrides ``allow_outside_input`` when given.

    Raises:
        InputError: the input as a whole is unusable: missing, the wrong shape for the format, unreadable
            (malformed COCO JSON, a compressed or non-tar ``.tar``), duplicate keys, or no items at all.
    """
    fmt = get_reader(detect_format(path) if input_format == "auto" else input_format)
    fmt.check_shape(path)
    return checked_items(fmt, path, options or ReadOptions(allow_outside_input=allow_outside_input))


def plan_input(path: str, input_format: str, options: ReadOptions, item_lists: bool = False) -> PlannedInput:
    """What the planner splits into shards: sorted items, or (tables, WebDataset tars) input files with row counts.

    Args:
        item_lists: plan as an item list where the format allows both (resuming an older item-list plan).

    Raises:
        InputError: the input cannot be read as ``input_format``.
    """
    fmt = get_reader(input_format)
    fmt.check_shape(path)
    return fmt.plan(path, options, item_lists)


def _range_reader(url: str) -> InputFormat:
    lower = url.lower()
    for fmt in READERS.values():
        if fmt.range_suffixes and lower.endswith(fmt.range_suffixes):
            return fmt
    raise OSError(f"{url}: no reader reads row ranges of this file")


def shard_items(spec: dict, options: ReadOptions) -> list[dict]:
    """The items of one planned shard, in plan order: its ``items`` (item-list plans) or its ranges, read now.

    Memory: one shard's items (``samples_per_shard``), never the whole input.

    Raises:
        OSError: an input file cannot be read or no longer holds the planned rows, or keys repeat (the shard
            attempt fails).
    """
    if "items" in spec:
        return spec["items"]
    items: list[dict] = []
    for r in spec["ranges"]:
        items += _range_reader(r["url"]).range_items(r["url"], r["start"], r["stop"], options)
    if len({it["key"] for it in items}) != len(items):
        seen: set[str] = set()
        dup = next(it["key"] for it in items if it["key"] in seen or seen.add(it["key"]))
        raise OSError(f"shard {spec['shard']}: sample key {dup!r} repeats (table.key_column must be unique)")
    return items


def read_source_bytes(source: str) -> bytes:
    """Bytes of a file path or URL, a ``TAR#MEMBER`` or a ``PARQUET#COLUMN/ROW`` (Pick-a-Pic) reference.

    Raises:
        OSError: unreadable, or a tar member that is missing or cut short (truncated tar).
    """
    if not source:
        raise OSError("the input names no image for this item")
    if pickapic.is_cell_source(source):
        return pickapic.read_parquet_cell(source)
    if webdataset.is_member_source(source):
        return webdataset.read_member(source)
    if is_url(source):
        try:
            return resolve(source).read_bytes()
        except UserError as exc:
            raise OSError(str(exc)) from None
    with open(source, "rb") as f:
        return f.read()


__all__ = [
    "FORMATS", "IMAGE_EXTENSIONS", "READERS", "TABLE_SUFFIXES", "InputError", "InputFormat", "PlannedInput",
    "ReadOptions", "TableColumns", "check_input_shape", "detect_format", "get_reader", "plan_input", "read_items",
    "read_source_bytes", "same_file", "shard_items",
]

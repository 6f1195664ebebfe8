"""What every input format shares: the item record, the reader contract, options, warnings, file identities.

An *item* is a plain dict (JSON-serialisable, so it goes into ``plan.json``)::

    {"key": "dogs/001", "source": "/data/dogs/001.jpg", "caption": "a dog",
     "mask_path": "/data/masks/dogs/001.png" | None, "mask_kind": "binary" | "cocostuff" | None}

An :class:`InputFormat` owns one format end to end: the shape check of an input path, its *listing* (every item),
its *planning* (:meth:`InputFormat.plan`: an item list, or row ranges of input files for formats that can be read
by range) and the *reading* of a planned range (:meth:`InputFormat.range_items`). :mod:`triplets.readers` holds
the registry and the entry points; the planner (:mod:`pipelines.plan`) and the worker only call those.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from cnc.base.errors import UserError
from cnc.base.hashing import stream_sha256
from cnc.base.location import Location, resolve

log = logging.getLogger("triplets.readers")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FORMATS = ("folder", "coco", "webdataset", "pickapic", "table")
#: File names of table inputs (:mod:`triplets.readers.table`).
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")
#: Per-item problems are logged one line each up to this many per kind, then summarised.
MAX_ITEM_WARNINGS = 10


class InputError(UserError, ValueError):
    """The input as a whole cannot be read as the requested format (``cnc build`` exits 2 with this one line)."""


@dataclass(frozen=True)
class TableColumns:
    """Column names of a table input (``table:`` config section)."""

    image: str = "url"
    caption: str = "caption"
    key: str = "key"
    mask: str | None = None


@dataclass(frozen=True)
class ReadOptions:
    """What the readers take from the build config.

    Attributes:
        allow_outside_input: follow symlinks and COCO ``file_name`` values outside the input root.
        content_hash: identify input files (tables, tars) by a sha256 of their content, not size + etag/mtime.
        columns: column names of a table input.
    """

    allow_outside_input: bool = False
    content_hash: bool = False
    columns: TableColumns = field(default_factory=TableColumns)

    @classmethod
    def from_config(cls, cfg) -> ReadOptions:
        """From a :class:`triplets.config.BuildConfig` (``allow_outside_input``, ``input_hash``, ``table``)."""
        t = cfg.table
        return cls(cfg.allow_outside_input, cfg.input_hash,
                   TableColumns(t.image_column, t.caption_column, t.key_column, t.mask_column))


@dataclass
class PlannedInput:
    """What a format's planning hands the planner: ``items`` (sorted, unique keys: an item-list plan) or ``files``
    (``[{"url", "size", "etag"|"mtime", ["sha256"], "rows"}]`` in input order: a row-range plan)."""

    items: list[dict] | None = None
    files: list[dict] | None = None


class ItemWarnings:
    """Per-item reader warnings: the first few are logged verbatim, the rest counted per kind."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, msg: str, *args) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= MAX_ITEM_WARNINGS:
            log.warning(msg, *args)

    def summary(self) -> None:
        for kind, n in self.counts.items():
            if n > MAX_ITEM_WARNINGS:
                log.warning("%d more inputs skipped: %s", n - MAX_ITEM_WARNINGS, kind)


class InputFormat:
    """One input format (see the module docstring). Subclasses set :attr:`name` and implement
    :meth:`check_shape` and :meth:`list_items`; formats planned by row ranges override :meth:`plan` and
    :meth:`range_items`."""

    name = ""
    #: File suffixes whose row ranges this format reads (:meth:`range_items`).
    range_suffixes: tuple[str, ...] = ()

    def check_shape(self, path: str) -> None:
        """Raise :class:`InputError` when ``path`` cannot be an input of this format (``coco`` on a folder...)."""

    def list_items(self, path: str, warn: ItemWarnings, options: ReadOptions) -> list[dict]:
        """Every item of the input, in any order."""
        raise NotImplementedError

    def plan(self, path: str, options: ReadOptions, item_lists: bool = False) -> PlannedInput:
        """The planned input: by default every item (sorted by key, keys unique; see :func:`checked_items`).

        Args:
            item_lists: plan as an item list even where row ranges are possible (resuming an older plan).
        """
        return PlannedInput(items=checked_items(self, path, options))

    def range_items(self, url: str, start: int, stop: int, options: ReadOptions) -> list[dict]:
        """The items ``[start, stop)`` of input file ``url`` (row-range plans only).

        Raises:
            OSError: the file cannot be read, or no longer holds the planned items (the shard attempt fails).
        """
        raise NotImplementedError(f"{self.name} inputs are not planned by row ranges")


def checked_items(fmt: InputFormat, path: str, options: ReadOptions) -> list[dict]:
    """``fmt``'s items of ``path``, sorted by key, with per-item warnings summarised.

    Raises:
        InputError: unreadable input, duplicate keys, or no items at all.
    """
    warn = ItemWarnings()
    try:
        items = fmt.list_items(path, warn, options)
    except OSError as exc:
        raise InputError(f"cannot read input {path!r}: {exc.strerror or exc}") from None
    warn.summary()
    items.sort(key=lambda it: it["key"])
    seen: set[str] = set()
    for it in items:
        if it["key"] in seen:
            raise InputError(f"two inputs map to the same sample key {it['key']!r}; rename one of them")
        seen.add(it["key"])
    if not items:
        raise InputError(f"input {path!r} ({fmt.name}) holds no usable images")
    log.info("read %d items from %s (%s)", len(items), path, fmt.name)
    return items


def make_item(key: str, source: str, caption: str, mask: str | None = None, mask_kind: str | None = None) -> dict:
    """The item record (module docstring)."""
    return {"key": key, "source": source, "caption": caption, "mask_path": mask, "mask_kind": mask_kind}


class Where:
    """The few path queries the readers make, on local disk or any fsspec filesystem."""

    def __init__(self, path: str | Path | Location):
        self.loc = resolve(path if isinstance(path, Location) else str(path))
        self.suffix = posixpath.splitext(self.loc.name)[1]

    def is_dir(self) -> bool:
        return self.loc.isdir()

    def is_file(self) -> bool:
        return self.loc.isfile()

    def exists(self) -> bool:
        return self.loc.exists()


def has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def is_utf8(name: str) -> bool:
    """Whether a file name read from disk decodes as UTF-8 (``os`` maps bad bytes to lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root`` (resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def text_lines(data: bytes, where: str | Path, warn: ItemWarnings) -> list[tuple[int, str]]:
    """``(line number, text)`` of UTF-8 text read from ``where``; lines that are not UTF-8 are skipped with a
    warning."""
    out = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            warn("caption line not UTF-8", "%s:%d: not UTF-8 (byte %d); line skipped", where, n, exc.start)
            continue
        if line.strip():
            out.append((n, line))
    return out


# -- input files planned by row ranges (tables, WebDataset tars) ---------------------------------------------------
def file_identity(loc: Location, content_hash: bool = False) -> dict:
    """``{"url", "size", "etag" | "mtime", ["sha256"]}``: what makes a changed input file detectable."""
    info = loc.fs.info(loc.path)
    out: dict = {"url": loc.url, "size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        out["etag"] = str(etag).strip('"')
    else:
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
        out["mtime"] = mtime if isinstance(mtime, (int, float)) else str(mtime) if mtime is not None else None
    if content_hash:
        with loc.open("rb") as f:
            out["sha256"] = stream_sha256(f)
    return out


def same_file(old: dict, new: dict) -> bool:
    """Whether two :func:`file_identity` records describe the same content.

    With a sha256 on both sides only the hashes count (a copied file keeps its hash but not its mtime); otherwise
    size and etag/mtime must match.
    """
    if old.get("url") != new.get("url") or old.get("size") != new.get("size"):
        return False
    if old.get("sha256") and new.get("sha256"):
        return old["sha256"] == new["sha256"]
    return old.get("etag") == new.get("etag") and old.get("mtime") == new.get("mtime")

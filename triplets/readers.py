"""Input readers: turn an input path into a sorted list of source items.

An item is a plain dict (JSON-serialisable, so it goes into ``plan.json``)::

    {"key": "dogs/001", "source": "/data/dogs/001.jpg", "caption": "a dog",
     "mask_path": "/data/masks/dogs/001.png" | None, "mask_kind": "binary" | "cocostuff" | None}

Sources are file paths, fsspec URLs (``s3://bucket/photos/a.jpg``) or ``TAR#MEMBER`` references into WebDataset
shards. Every input may live on object storage (``s3://``, ``gs://``, any fsspec filesystem): the driver lists it
(one recursive listing, no download of images) and the workers read each source directly.

Supported inputs (detected from the path, or forced with ``input_format``):

* ``folder`` — a folder of images. Captions come from ``captions.jsonl`` (``{"key"|"file": ..,
  "caption": ..}``; key = path relative to the folder with or without extension), or
  ``captions.txt`` with ``uid:caption`` lines (split on the *first* colon, so captions keep
  theirs), or a ``.txt`` file beside each image. Optional dataset masks in ``masks/`` with the
  same relative path and a ``.png`` extension.
* ``coco`` — a COCO captions JSON (``captions_train2017.json``); images are looked up in
  ``<root>/<split>/`` where the split is taken from the file name; each image's caption is its first
  annotation in file order with newlines turned into spaces, as the reference. COCO-Stuff
  ``stuffthingmaps_trainval2017/<split>/``
  next to the images provides ``cocostuff`` dataset masks when present.
* ``webdataset`` — a ``.tar`` file, a brace pattern (``data/{000..009}.tar``) or a folder of
  tars with ``jpg``/``png``/``webp`` + ``txt`` members (img2dataset output).
* ``table`` — parquet/CSV/JSONL file(s) with an image path/URL column and a caption column (a file, a folder of
  them or a glob; :mod:`triplets.readers_table`). Planned by row ranges, never listed item by item: the input for
  more than ~1M images. A parquet file with Pick-a-Pic v1's columns is detected as ``pickapic`` instead.

Size: the folder, COCO and WebDataset readers on local disk and object storage share their per-item rules (keys,
captions, masks, quarantine warnings); table and Pick-a-Pic inputs live in their own modules.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import tarfile
from pathlib import Path

from cnc.base.errors import UserError
from cnc.base.location import Location, is_url, resolve
from triplets.sample import make_key

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FORMATS = ("folder", "coco", "webdataset", "pickapic", "table")
#: File names of table inputs (:mod:`triplets.readers_table`).
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")
#: Columns that make a parquet file a Pick-a-Pic v1 file rather than a generic table.
_PICKAPIC_COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1")


class InputError(UserError, ValueError):
    """The input as a whole cannot be read as the requested format (``cnc build`` exits 2 with this one line)."""


#: Per-item problems are logged one line each up to this many per kind, then summarised.
_MAX_ITEM_WARNINGS = 10
#: Magic bytes of compressed files: a compressed tar cannot be read by offset (``TAR#MEMBER`` sources).
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class _Warnings:
    """Per-item reader warnings: the first few are logged verbatim, the rest counted per kind."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, msg: str, *args) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= _MAX_ITEM_WARNINGS:
            log.warning(msg, *args)

    def summary(self) -> None:
        for kind, n in self.counts.items():
            if n > _MAX_ITEM_WARNINGS:
                log.warning("%d more inputs skipped: %s", n - _MAX_ITEM_WARNINGS, kind)


def _is_utf8(name: str) -> bool:
    """Whether a file name read from disk decodes as UTF-8 (``os`` maps bad bytes to lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root`` (resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def _compression(path: str | Path) -> str | None:
    """``gzip`` | ``bzip2`` | ``xz`` | ``zstd`` when the file starts with that magic, else ``None``."""
    with resolve(str(path)).open("rb") as f:
        head = f.read(6)
    return next((name for magic, name in _COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def _parquet_kind(path: str) -> str:
    """``table`` unless the parquet file has Pick-a-Pic v1's columns (or is unreadable: the Pick-a-Pic reader then
    reports why)."""
    try:
        import pyarrow.parquet as pq

        with resolve(path).open("rb") as f:
            names = set(pq.ParquetFile(f).schema_arrow.names)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader, with its reason
        return "pickapic"
    return "pickapic" if all(c in names for c in _PICKAPIC_COLUMNS) else "table"


def _tables_kind(names: list[str]) -> str | None:
    """``table`` / ``pickapic`` for a listing holding table files (the first parquet decides), else ``None``."""
    tables = sorted(n for n in names if n.lower().endswith(TABLE_SUFFIXES))
    if not tables:
        return None
    parquet = next((n for n in tables if n.lower().endswith(".parquet")), None)
    return _parquet_kind(parquet) if parquet else "table"


def detect_format(path: str) -> str:
    """``folder`` | ``coco`` | ``webdataset`` | ``table`` | ``pickapic`` from the shape of ``path``.

    What exists on disk is checked first, so a folder named ``photos.tar`` or ``a{1}`` is a folder. A folder without
    images or tars but with ``.parquet``/``.csv``/``.jsonl`` files, such a file, or a glob of them is a table (or
    Pick-a-Pic, when the first parquet file has its columns).
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
        if p.suffix.lower() == ".parquet":
            return _parquet_kind(path)  # Pick-a-Pic v1 (triplets.readers_pickapic) or a generic table
        if p.suffix.lower() in (".csv", ".jsonl"):
            return "table"
        if p.suffix.lower() == ".json":
            return "coco"
        if p.suffix.lower() == ".tar":
            return "webdataset"
        raise InputError(f"input {path!r} is a file but neither a COCO .json nor a .tar")
    if "{" in path and "}" in path:
        return "webdataset"
    if any(c in path for c in "*?[") and path.lower().endswith(TABLE_SUFFIXES):
        matches = sorted(str(m) for m in Path(path).parent.glob(Path(path).name)) if "/" in path else []
        return _tables_kind(matches) or "table"
    raise InputError(f"input {path!r} does not exist or is not a folder, a COCO .json, a .tar/brace pattern or "
                     f"a table (.parquet/.csv/.jsonl)")


def _detect_remote(url: str) -> str:
    loc = resolve(url)
    if any(c in loc.path for c in "*?[") and url.lower().endswith(TABLE_SUFFIXES):
        return _tables_kind([loc.fs.unstrip_protocol(p) for p in loc.fs.glob(loc.path)]) or "table"
    if loc.isdir():
        found = loc.fs.find(loc.path)
        names = [p.rsplit("/", 1)[-1] for p in found]
        has_images = any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names)
        if not has_images and any(n.endswith(".tar") for n in names):
            return "webdataset"
        if not has_images:
            return _tables_kind([loc.fs.unstrip_protocol(p) for p in found]) or "folder"
        return "folder"
    if loc.isfile():
        if loc.name.lower().endswith(".parquet"):
            return _parquet_kind(url)
        if loc.name.lower().endswith((".csv", ".jsonl")):
            return "table"
        if loc.name.lower().endswith(".json"):
            return "coco"
        if loc.name.lower().endswith(".tar"):
            return "webdataset"
        raise InputError(f"input {url!r} is a file but neither a COCO .json nor a .tar")
    if "{" in url and "}" in url:
        return "webdataset"
    raise InputError(f"input {url!r} does not exist or is not a folder, a COCO .json or a .tar/brace pattern")


def check_input_shape(path: str, fmt: str) -> None:
    """Refuse a forced ``input_format`` that does not fit what ``path`` is (``coco`` on a folder...)."""
    p = _Where(path)
    if fmt == "folder" and not p.is_dir():
        raise InputError(f"input_format=folder needs a folder, {path!r} is not one")
    if fmt == "coco" and not (p.is_file() and p.suffix.lower() == ".json"):
        raise InputError(f"input_format=coco needs a COCO captions .json file, {path!r} is not one")
    if fmt == "table" and not (p.is_dir() or (p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
                               or any(c in path for c in "*?[")):
        raise InputError(f"input_format=table needs a .parquet/.csv/.jsonl file, a folder or a glob of them, "
                         f"{path!r} is none of these")
    if fmt == "webdataset" and not (p.is_dir() or (p.is_file() and p.suffix.lower() == ".tar")
                                    or ("{" in path and not p.exists())):
        raise InputError(f"input_format=webdataset needs a .tar, a brace pattern or a folder of tars, "
                         f"{path!r} is none of these")


def read_items(path: str, input_format: str = "auto", *, allow_outside_input: bool = False) -> list[dict]:
    """All source items of ``path``, sorted by key.

    Items that cannot be used (non-UTF-8 names, links outside the input...) are skipped with a warning each.

    Args:
        allow_outside_input: follow symlinks and COCO ``file_name`` values that point outside the input root
            (refused per item by default).

    Raises:
        InputError: the input as a whole is unusable: missing, the wrong shape for the format, unreadable
            (malformed COCO JSON, a compressed or non-tar ``.tar``), duplicate keys, or no items at all.
    """
    fmt = detect_format(path) if input_format == "auto" else input_format
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; valid: {', '.join(FORMATS)}")
    check_input_shape(path, fmt)
    warn = _Warnings()
    reader = {"folder": _read_folder, "coco": _read_coco, "webdataset": _read_webdataset,
              "pickapic": _read_pickapic, "table": _read_table}[fmt]
    try:
        items = reader(path, warn, allow_outside_input)
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
        raise InputError(f"input {path!r} ({fmt}) holds no usable images")
    log.info("read %d items from %s (%s)", len(items), path, fmt)
    return items


class _Where:
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


def _read_pickapic(path: str, warn: _Warnings, allow_outside_input: bool = False) -> list[dict]:
    from triplets.readers_pickapic import read_pickapic  # Pick-a-Pic v1 parquet: its own module

    return read_pickapic(path)


def _read_table(path: str, warn: _Warnings, allow_outside_input: bool = False) -> list[dict]:
    """Every row of a table input as items (small tables only: builds plan tables by row range, see
    :func:`pipelines.plan.make_table_plan`)."""
    from triplets.readers_table import TableColumns, TableInput, read_rows

    table = TableInput(path, TableColumns())
    return [it for f in table.files for it in read_rows(f.identity["url"], 0, f.rows, TableColumns())]


def _item(key: str, source: str, caption: str, mask: str | None = None, mask_kind: str | None = None) -> dict:
    return {"key": key, "source": source, "caption": caption, "mask_path": mask, "mask_kind": mask_kind}


def _text_lines(data: bytes, where: str | Path, warn: _Warnings) -> list[tuple[int, str]]:
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


CAPTION_FILES = ("captions.jsonl", "captions.txt")


def _folder_captions(root: Path | Location, warn: _Warnings) -> dict[str, str]:
    """Captions of a folder (local or on object storage) from ``captions.jsonl`` and ``captions.txt``."""
    caps: dict[str, str] = {}
    where: dict[str, str] = {}

    def put(key: str, caption: str, origin: str) -> None:
        if key in caps:
            warn("duplicate caption key", "%s: caption key %r repeats %s; the later caption is used", origin, key,
                 where[key])
        caps[key], where[key] = caption, origin

    for name in CAPTION_FILES:
        loc = root.child(name) if isinstance(root, Location) else resolve(root / name)
        if not loc.isfile():
            continue
        for n, line in _text_lines(loc.read_bytes(), loc.url, warn):
            if name.endswith(".txt"):
                if ":" not in line:
                    warn("bad caption line", "%s:%d: no 'uid:caption' separator; skipped", loc.url, n)
                    continue
                uid, cap = line.split(":", 1)
                put(uid.strip(), cap.strip(), f"{name}:{n}")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            key = row.get("key", row.get("file")) if isinstance(row, dict) else None
            caption = row.get("caption") if isinstance(row, dict) else None
            if not isinstance(key, str) or not key:
                warn("bad caption line", "%s:%d: not a {key, caption} JSON object with a string key; skipped",
                     loc.url, n)
            elif not isinstance(caption, str):
                warn("bad caption line", "%s:%d: caption of %r is %s, not a string; skipped", loc.url, n, key,
                     "null" if caption is None else type(caption).__name__)
            else:
                put(key, caption, f"{name}:{n}")
    return caps


def _side_caption(f: Path, warn: _Warnings) -> str | None:
    side = f.with_suffix(".txt")
    if not side.is_file():
        return None
    try:
        return side.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        warn("caption file not UTF-8", "%s: not UTF-8 (byte %d); the image gets no caption", side, exc.start)
    except OSError as exc:
        warn("caption file unreadable", "%s: unreadable (%s); the image gets no caption", side, exc.strerror)
    return None


def _read_folder(path: str, warn: _Warnings, allow_outside_input: bool = False) -> list[dict]:
    if is_url(path):
        return _read_remote_folder(resolve(path), warn)
    root = Path(path)
    caps = _folder_captions(root, warn)
    items, missing = [], 0
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() not in IMAGE_EXTENSIONS or "masks" in f.relative_to(root).parts[:1] or not f.is_file():
            continue
        rel = f.relative_to(root).as_posix()
        if not _is_utf8(rel):
            warn("file name not UTF-8", "%s: file name is not valid UTF-8; skipped (rename it)", _printable(str(f)))
            continue
        if not allow_outside_input and not _inside(f, root):
            warn("outside the input", "%s: links outside the input folder (to %s); skipped "
                 "(allow_outside_input=true to follow)", f, f.resolve())
            continue
        stem = rel.rsplit(".", 1)[0]
        caption = caps.get(rel, caps.get(stem, caps.get(f.stem)))
        if caption is None:
            caption = _side_caption(f, warn)
        if caption is None:
            missing += 1
            caption = ""
        mask = root / "masks" / (stem + ".png")
        has_mask = mask.is_file()
        if has_mask and not allow_outside_input and not _inside(mask, root):
            warn("outside the input", "%s: mask links outside the input folder; the image is used without it", mask)
            has_mask = False
        items.append(_item(make_key(rel), str(f), caption, str(mask) if has_mask else None,
                           "binary" if has_mask else None))
    if missing:
        log.warning("%d images in %s have no caption; they get an empty caption", missing, root)
    return items


def _read_remote_folder(root: Location, warn: _Warnings) -> list[dict]:
    """A folder of images on object storage: one recursive listing; captions files read, images never."""
    base = root.path.rstrip("/")
    files = {p[len(base) + 1:] for p in root.fs.find(base)}
    caps = _folder_captions(root, warn)
    items, missing = [], 0
    for rel in sorted(files):
        if not rel.lower().endswith(IMAGE_EXTENSIONS) or rel.split("/", 1)[0] == "masks":
            continue
        stem = rel.rsplit(".", 1)[0]
        caption = caps.get(rel, caps.get(stem, caps.get(stem.rsplit("/", 1)[-1])))
        if caption is None and stem + ".txt" in files:
            try:
                caption = root.child(stem + ".txt").read_bytes().decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                warn("caption file not UTF-8", "%s.txt: not UTF-8 (byte %d); the image gets no caption", stem,
                     exc.start)
        if caption is None:
            missing += 1
            caption = ""
        mask = f"masks/{stem}.png"
        has_mask = mask in files
        items.append(_item(make_key(rel), root.child(rel).url, caption, root.child(mask).url if has_mask else None,
                           "binary" if has_mask else None))
    if missing:
        log.warning("%d images in %s have no caption; they get an empty caption", missing, root.url)
    return items


def _coco_id(value) -> int | None:
    """A COCO id as int (ints, or strings of digits), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _read_coco(path: str, warn: _Warnings, allow_outside_input: bool = False) -> list[dict]:
    if is_url(path):
        return _read_coco_at(resolve(path), warn)
    ann_path = Path(path)
    data = _coco_data(resolve(path))
    split = ann_path.stem.split("_")[-1]
    candidates = [ann_path.parent.parent / split, ann_path.parent / split, ann_path.parent.parent / "images" / split]
    images_dir = next((c for c in candidates if c.is_dir()), None)
    if images_dir is None:
        raise InputError(f"COCO images for split {split!r} not found in any of {[str(c) for c in candidates]}")
    stuff_dir = next((c for c in (images_dir.parent / "stuffthingmaps_trainval2017" / split,
                                  ann_path.parent.parent / "stuffthingmaps_trainval2017" / split) if c.is_dir()), None)
    first = _coco_first_captions(data, warn, path)
    items, absent = [], 0
    for n, img in enumerate(data["images"]):
        img_id = _coco_id(img.get("id")) if isinstance(img, dict) else None
        name = img.get("file_name") if isinstance(img, dict) else None
        if img_id is None or not isinstance(name, str) or not name:
            warn("bad COCO image", "%s: images[%d] lacks an integer id or a file_name; skipped", path, n)
            continue
        f = images_dir / name
        if not allow_outside_input and not _inside(f, images_dir):
            warn("outside the input", "%s: images[%d] file_name %r points outside %s; skipped "
                 "(allow_outside_input=true to follow)", path, n, name, images_dir)
            continue
        if not f.is_file():
            absent += 1
            continue
        key = f"{img_id:012d}"
        mask = stuff_dir / f"{key}.png" if stuff_dir else None
        has_mask = mask is not None and mask.is_file()
        items.append(_item(key, str(f), first.get(img_id, ""), str(mask) if has_mask else None,
                           "cocostuff" if has_mask else None))
    if absent:
        log.warning("%d COCO images listed in %s are not on disk; skipped", absent, ann_path)
    return items


def _coco_first_captions(data: dict, warn: _Warnings, where: str) -> dict[int, str]:
    """image id → its caption, by the reference's rule (``data/parse_cocostuff.py``): the **first annotation in
    file order** for the image, with ``\\n`` and ``\\r`` replaced by a space (nothing else changed)."""
    first: dict[int, str] = {}
    for n, ann in enumerate(data.get("annotations", [])):
        img_id = _coco_id(ann.get("image_id")) if isinstance(ann, dict) else None
        caption = ann.get("caption") if isinstance(ann, dict) else None
        if img_id is None or not isinstance(caption, str):
            warn("bad COCO annotation", "%s: annotations[%d] lacks an integer image_id or a string caption; "
                 "skipped", where, n)
            continue
        if img_id not in first:
            first[img_id] = caption.replace("\n", " ").replace("\r", " ")
    return first


def _coco_data(ann: Location) -> dict:
    try:
        data = json.loads(ann.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{ann.url}: not a UTF-8 JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise InputError(f"{ann.url}: not a COCO captions file (expected an object with 'images' and 'annotations' "
                         f"lists, got {type(data).__name__})")
    return data


def _read_coco_at(ann: Location, warn: _Warnings) -> list[dict]:
    """COCO on object storage: the same rules as on disk; image existence from one listing of the split."""
    data = _coco_data(ann)
    split = posixpath.splitext(ann.name)[0].split("_")[-1]
    root = ann.parent.parent
    candidates = [root.child(split), ann.parent.child(split), root.child("images", split)]
    images_dir = next((c for c in candidates if c.isdir()), None)
    if images_dir is None:
        raise InputError(f"COCO images for split {split!r} not found in any of {[c.url for c in candidates]}")
    present = set(images_dir.list())
    stuff_dir = next((c for c in (images_dir.parent.child("stuffthingmaps_trainval2017", split),
                                  root.child("stuffthingmaps_trainval2017", split)) if c.isdir()), None)
    stuff = set(stuff_dir.list()) if stuff_dir else set()
    first = _coco_first_captions(data, warn, ann.url)
    items, absent = [], 0
    for n, img in enumerate(data["images"]):
        img_id = _coco_id(img.get("id")) if isinstance(img, dict) else None
        name = img.get("file_name") if isinstance(img, dict) else None
        if img_id is None or not isinstance(name, str) or not name or "/" in name or name.startswith(".."):
            warn("bad COCO image", "%s: images[%d] lacks an integer id or a plain file_name; skipped", ann.url, n)
            continue
        if name not in present:
            absent += 1
            continue
        key = f"{img_id:012d}"
        has_mask = f"{key}.png" in stuff
        items.append(_item(key, images_dir.child(name).url, first.get(img_id, ""),
                           stuff_dir.child(f"{key}.png").url if has_mask else None, "cocostuff" if has_mask else None))
    if absent:
        log.warning("%d COCO images listed in %s are not in %s; skipped", absent, ann.url, images_dir.url)
    return items


def expand_shards(path: str) -> list[str]:
    """The tars of a WebDataset input: :func:`triplets.shardio.resolve_shards` (folder, brace pattern, glob, URL,
    ``pipe:``), with its refusal as an :class:`InputError`.

    Raises:
        InputError: when shards named by the pattern are missing, or a folder holds none.
    """
    from triplets.shardio import ShardSpecError, resolve_shards

    try:
        return resolve_shards(path)
    except ShardSpecError as exc:
        raise InputError(str(exc)) from None


def _open_plain_tar(tar: str) -> tarfile.TarFile:
    """Open an uncompressed tar (members are read by byte offset later); URLs are read as one stream.

    Raises:
        InputError: the file is compressed or not a tar.
    """
    comp = _compression(tar)
    if comp:
        raise InputError(f"{tar} is {comp}-compressed; input tars must be uncompressed "
                         f"(decompress it first, e.g. with {'gunzip' if comp == 'gzip' else comp + ' -d'})")
    try:
        if is_url(tar):
            return tarfile.open(fileobj=resolve(tar).open("rb"), mode="r:")
        return tarfile.open(tar, mode="r:")
    except tarfile.TarError as exc:
        raise InputError(f"{tar} is not a readable tar ({exc})") from None


def _read_webdataset(path: str, warn: _Warnings, allow_outside_input: bool = False) -> list[dict]:
    return [it for tar in expand_shards(path) for it in tar_items(tar, warn)]


def tar_items(tar: str, warn: _Warnings | None = None) -> list[dict]:
    """The items of one WebDataset tar in member order (one per image member; caption from the ``txt`` member).

    Raises:
        InputError: the tar is compressed or not a tar.
    """
    warn = warn or _Warnings()
    items = []
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    size = resolve(tar).size() or 0
    with _open_plain_tar(tar) as tf:
        try:
            for m in tf:
                if not m.isfile() or "." not in Path(m.name).name:
                    continue
                if not _is_utf8(m.name):
                    warn("member name not UTF-8", "%s: member %s has a name that is not valid UTF-8; skipped",
                         tar, _printable(m.name))
                    continue
                base, name = m.name.rsplit("/", 1) if "/" in m.name else ("", m.name)
                key, ext = name.split(".", 1)
                members.setdefault(f"{base}/{key}" if base else key, {})[ext.lower()] = m
        except (tarfile.TarError, EOFError) as exc:
            log.warning("%s is truncated or corrupt after %d members (%s); the members before are used",
                        tar, sum(map(len, members.values())), exc)
        for key, exts in members.items():
            img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in exts), None)
            if img_ext is None:
                continue
            caption = ""
            txt = exts.get("txt")
            if txt is not None and txt.offset_data + txt.size <= size:
                data = tf.extractfile(txt).read()
                try:
                    caption = data.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    warn("caption member not UTF-8", "%s#%s: not UTF-8 (byte %d); the image gets no caption",
                         tar, txt.name, exc.start)
            source_id = f"{posixpath.splitext(tar.rsplit('/', 1)[-1])[0]}/{key}"
            items.append(_item(make_key(source_id), f"{tar}#{exts[img_ext].name}", caption))
    return items


@functools.lru_cache(maxsize=8)
def _open_tar_index(tar: str) -> dict[str, tuple[int, int]]:
    index = {}
    try:
        with _open_plain_tar(tar) as tf:
            for m in tf:
                if m.isfile():
                    index[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, InputError):
        pass  # truncated: the members before the cut are indexed; read_source_bytes reports the cut one
    return index


def read_source_bytes(source: str) -> bytes:
    """Bytes of a file path, a URL, a ``TAR#MEMBER`` or a ``PARQUET#COLUMN/ROW`` (Pick-a-Pic) reference.

    HTTP(S) URLs go through :func:`triplets.fetch.fetch_url` (default ``fetch:`` settings); the shard worker reads
    its items through a :class:`triplets.fetch.Fetcher` instead, many at once.

    Raises:
        OSError: unreadable, or a tar member that is missing or cut short (truncated tar).
    """
    if not source:
        raise OSError("the input names no image for this item")
    if "#" in source and source.split("#", 1)[0].endswith(".parquet"):
        from triplets.readers_pickapic import read_parquet_cell

        return read_parquet_cell(source)
    if "#" in source and source.split("#", 1)[0].endswith(".tar"):
        tar, member = source.split("#", 1)
        entry = _open_tar_index(tar).get(member)
        if entry is None:
            raise OSError(f"member {member!r} not found in {tar}")
        offset, size = entry
        with resolve(tar).open("rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"tar member {member!r} is truncated ({len(data)} of {size} bytes)")
        return data
    if is_url(source):
        from triplets.fetch import fetch_url, is_http

        if is_http(source):  # timeouts, retries, size limit and opt-outs (triplets.fetch), never a bare GET
            return fetch_url(source)
        try:
            return resolve(source).read_bytes()
        except UserError as exc:
            raise OSError(str(exc)) from None
    with open(source, "rb") as f:
        return f.read()

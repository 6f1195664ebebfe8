"""``webdataset`` inputs: a ``.tar`` file, a brace pattern (``data/{000..009}.tar``) or a folder of tars with
``jpg``/``png``/``webp`` + ``txt`` members (img2dataset output), local or on object storage.

* **listing** (:func:`tar_items`): one item per image member, in member order; the caption from the ``txt``
  member; sources are ``TAR#MEMBER`` references; member names split into key and suffix as WebDataset does
  (:func:`triplets.shardio.names.split_member`).
* **planning**: row ranges over the tars (samples ``[start, stop)`` of a tar in member order), the tars' headers
  read 16 at a time, items not kept; an output holding an older item-list plan keeps one (``item_lists``).
* **reading**: :meth:`WebDatasetFormat.range_items` lists a planned tar again (cached per worker) and
  :func:`read_member` reads one ``TAR#MEMBER`` by byte offset, so input tars must be uncompressed.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor

from cnc.base.location import is_url, resolve
from triplets.readers.base import (
    InputError,
    InputFormat,
    ItemWarnings,
    PlannedInput,
    ReadOptions,
    Where,
    file_identity,
    is_utf8,
    make_item,
    printable,
)
from triplets.sample import make_key
from triplets.shardio import ShardSpecError, resolve_shards
from triplets.shardio.names import split_member

log = logging.getLogger(__name__)
#: Magic bytes of compressed files: a compressed tar cannot be read by offset (``TAR#MEMBER`` sources).
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
#: Tars whose headers are read at once while planning (latency bound on object stores).
PLAN_THREADS = 16


def _compression(path: str) -> str | None:
    """``gzip`` | ``bzip2`` | ``xz`` | ``zstd`` when the file starts with that magic, else ``None``."""
    with resolve(str(path)).open("rb") as f:
        head = f.read(6)
    return next((name for magic, name in _COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def expand_shards(path: str) -> list[str]:
    """The tars of a WebDataset input: :func:`triplets.shardio.resolve_shards` (folder, brace pattern, glob, URL,
    ``pipe:``), with its refusal as an :class:`InputError`.

    Raises:
        InputError: when shards named by the pattern are missing, or a folder holds none.
    """
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


def tar_items(tar: str, warn: ItemWarnings | None = None) -> list[dict]:
    """The items of one WebDataset tar in member order (one per image member; caption from the ``txt`` member).

    Raises:
        InputError: the tar is compressed or not a tar.
    """
    warn = warn or ItemWarnings()
    items = []
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    size = resolve(tar).size() or 0
    with _open_plain_tar(tar) as tf:
        try:
            for m in tf:
                if not m.isfile():
                    continue
                if not is_utf8(m.name):
                    warn("member name not UTF-8", "%s: member %s has a name that is not valid UTF-8; skipped",
                         tar, printable(m.name))
                    continue
                key, suffix = split_member(m.name)
                if key is not None:
                    members.setdefault(key, {})[suffix] = m
        except (tarfile.TarError, EOFError) as exc:
            log.warning("%s is truncated or corrupt after %d members (%s); the members before are used",
                        tar, sum(map(len, members.values())), exc)
        for key, exts in members.items():
            img_ext = next((e for e in IMAGE_SUFFIXES if e in exts), None)
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
            items.append(make_item(make_key(source_id), f"{tar}#{exts[img_ext].name}", caption))
    return items


@functools.lru_cache(maxsize=8)
def _tar_index(tar: str) -> dict[str, tuple[int, int]]:
    index = {}
    try:
        with _open_plain_tar(tar) as tf:
            for m in tf:
                if m.isfile():
                    index[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, InputError):
        pass  # truncated: the members before the cut are indexed; read_member reports the cut one
    return index


def is_member_source(source: str) -> bool:
    """Whether ``source`` is a ``TAR#MEMBER`` reference."""
    return "#" in source and source.split("#", 1)[0].endswith(".tar")


def read_member(source: str) -> bytes:
    """Bytes of a ``TAR#MEMBER`` source (read by byte offset from the tar's index, cached per process).

    Raises:
        OSError: the member is missing or cut short (truncated tar).
    """
    tar, member = source.split("#", 1)
    entry = _tar_index(tar).get(member)
    if entry is None:
        raise OSError(f"member {member!r} not found in {tar}")
    offset, size = entry
    with resolve(tar).open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"tar member {member!r} is truncated ({len(data)} of {size} bytes)")
    return data


@functools.lru_cache(maxsize=4)
def _cached_tar_items(tar: str) -> list[dict]:
    """Items of one tar, kept for the next shard of the same tar (a worker's tar index)."""
    return tar_items(tar)


class WebDatasetFormat(InputFormat):
    """WebDataset tars (module docstring); planned by sample ranges of each tar."""

    name = "webdataset"
    range_suffixes = (".tar",)

    def check_shape(self, path: str) -> None:
        p = Where(path)
        if not (p.is_dir() or (p.is_file() and p.suffix.lower() == ".tar") or ("{" in path and not p.exists())):
            raise InputError(f"input_format=webdataset needs a .tar, a brace pattern or a folder of tars, "
                             f"{path!r} is none of these")

    def list_items(self, path: str, warn: ItemWarnings, options: ReadOptions) -> list[dict]:
        return [it for tar in expand_shards(path) for it in tar_items(tar, warn)]

    def plan(self, path: str, options: ReadOptions, item_lists: bool = False) -> PlannedInput:
        if item_lists:
            return super().plan(path, options)
        tars = expand_shards(path)
        if not tars:
            raise InputError(f"no .tar files in {path!r}")

        def one(tar: str) -> dict:
            return {**file_identity(resolve(tar), options.content_hash), "rows": len(tar_items(tar))}

        try:
            with ThreadPoolExecutor(min(PLAN_THREADS, len(tars))) as pool:
                files = list(pool.map(one, tars))
        except OSError as exc:
            raise InputError(f"cannot read input {path!r}: {exc.strerror or exc}") from None
        if not sum(f["rows"] for f in files):
            raise InputError(f"input {path!r} (webdataset) holds no usable images")
        return PlannedInput(files=files)

    def range_items(self, url: str, start: int, stop: int, options: ReadOptions) -> list[dict]:
        part = _cached_tar_items(url)[start:stop]
        if len(part) != stop - start:
            raise OSError(f"{url}: samples {start}..{stop} planned, {len(part)} found (the tar changed?)")
        return part


FORMAT = WebDatasetFormat()

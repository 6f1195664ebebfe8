"""Find shards and their sidecars, and stream one tar sample by sample.

A build output folder looks like::

    OUT/000000.tar            shard (written atomically)
    OUT/000000_stats.json     per-shard marker, written last: nsamples, sha256, bytes, seconds, failures...
    OUT/errors/000000.jsonl   one ``{key, source, stage, reason}`` row per failed source item
    OUT/plan.json, OUT/manifest.json, OUT/config.yaml

:class:`TarStream` reads a tar once, front to back (``tarfile`` streaming mode, so memory holds one
sample), hashes every byte on the way and checks the end-of-archive marker: ``tarfile`` silently
stops at a tar cut on a 512-byte boundary or at a garbled header, so a missing marker is the only
sign of those truncations.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from triplets.shards import TarTailReader, tar_member_end

log = logging.getLogger(__name__)

#: WebDataset's split of a member name into key and suffix: the suffix starts at the first dot of the basename.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


#: Default cap on one member's size: larger members are reported, never read into memory.
MAX_MEMBER_BYTES = 256 * 2**20


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class ShardReadError(Exception):
    """A tar cannot be read to its end (truncated or corrupt).

    Args:
        path: the tar.
        offset: byte offset where reading failed.
        message: what went wrong, without the path.
    """

    def __init__(self, path: str | Path, offset: int, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.offset, self.message = str(path), offset, message


def expand_braces(pattern: str) -> list[str]:
    """Expand WebDataset brace patterns: ``data/{000..002}.tar`` → three paths (zero padding kept)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def resolve_shards(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Tar files named by build folders, globs, brace patterns or tar paths, in a stable order.

    A folder contributes its ``*.tar`` (sorted by name); a glob its sorted matches; a brace pattern its
    expansion; a ``file://`` prefix is dropped. Duplicates are removed, first occurrence kept.

    Raises:
        FileNotFoundError: when nothing matches, naming the paths.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: list[Path] = []
    for item in items:
        s = str(item).removeprefix("file://")
        for one in expand_braces(s):
            p = Path(one)
            if p.is_dir():
                found += _regular(sorted(p.glob("*.tar")))
            elif glob.has_magic(one):
                found += _regular([Path(x) for x in sorted(glob.glob(one))])
            elif p.is_file():
                found.append(p)
            elif p.exists():
                log.warning("not a regular file (FIFO, device or socket?); skipped: %s", one)
            else:
                log.warning("no such file or folder: %s", one)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise FileNotFoundError(f"no .tar shards found in {', '.join(map(str, items))}")
    return unique


def _regular(paths: list[Path]) -> list[Path]:
    """Regular files only: opening a FIFO named like a shard would block forever."""
    out = []
    for p in paths:
        if p.is_file():
            out.append(p)
        elif not p.is_dir():
            log.warning("not a regular file (FIFO, device or socket?); skipped: %s", p)
    return out


def stats_marker_path(tar: Path) -> Path:
    """``OUT/000000.tar`` → ``OUT/000000_stats.json``."""
    return tar.with_name(tar.name.removesuffix(".tar") + "_stats.json")


def errors_path(tar: Path) -> Path:
    """``OUT/000000.tar`` → ``OUT/errors/000000.jsonl``."""
    return tar.parent / "errors" / (tar.name.removesuffix(".tar") + ".jsonl")


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``; ``None`` when missing. Raises ``ValueError`` when it is not an object."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def split_member(name: str) -> tuple[str | None, str | None]:
    """``"a/b.mask.png"`` → ``("a/b", "mask.png")``, as WebDataset groups members (suffix lower-cased)."""
    m = _KEY_SUFFIX.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


class TarStream:
    """One streaming pass over a local tar.

    Iterate :meth:`samples` to get WebDataset-style dicts ``{"__key__": key, suffix: bytes}`` (members of a
    sample are contiguous); afterwards :attr:`sha256` and :attr:`nbytes` describe the whole file.
    Member-level oddities that do not stop reading (a member without extension, a suffix repeated within one
    sample) go to ``on_problem``.

    Raises (from :meth:`samples`):
        ShardReadError: the tar ends early or holds a garbled header; the message names the byte offset.
    """

    def __init__(self, path: str | Path, on_problem: Callable[[str], None] | None = None,
                 max_member_bytes: int = MAX_MEMBER_BYTES):
        self.path = Path(path)
        self.on_problem = on_problem or (lambda msg: None)
        self.max_member_bytes = max_member_bytes
        self.sha256: str | None = None
        self.nbytes = 0

    def samples(self) -> Iterator[dict]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as raw:
            reader = TarTailReader(raw)
            current: dict | None = None
            member, end, compressed = None, 0, False
            try:
                with tarfile.open(fileobj=reader, mode="r|*") as tf:
                    compressed = getattr(tf.fileobj, "comptype", "tar") != "tar"
                    for member in tf:
                        end = tar_member_end(member)
                        if not member.isfile():
                            continue
                        if not _utf8(member.name):
                            self.on_problem(f"member name {_printable(member.name)!r} is not valid UTF-8 (skipped)")
                            continue
                        if member.size > self.max_member_bytes:
                            self.on_problem(f"member {member.name!r} is {member.size} bytes, over the limit of "
                                            f"{self.max_member_bytes} (max_member_bytes); not read")
                            continue
                        data = tf.extractfile(member).read()
                        key, suffix = split_member(member.name)
                        if key is None:
                            self.on_problem(f"member {member.name!r} has no extension (ignored by readers)")
                            continue
                        if current is not None and key != current["__key__"]:
                            yield current
                            current = None
                        if current is None:
                            current = {"__key__": key}
                        if suffix in current:
                            self.on_problem(f"key {key!r}: member {member.name!r} repeats suffix {suffix!r}")
                        current[suffix] = data
            except (tarfile.TarError, EOFError) as exc:
                raise ShardReadError(self.path, reader.pos, _truncation_message(exc, member, size, current)) from None
            if current is not None:
                yield current
            reader.drain()
            self.sha256, self.nbytes = reader.sha.hexdigest(), reader.pos
            problem = None if compressed else reader.end_marker_problem(end)  # compressed: offsets differ
        after = f"after the last sample {current['__key__']!r}" if current else "at the start"
        if problem == "missing":
            raise ShardReadError(self.path, size, f"truncated tar: file ends at byte {size}, {after}, "
                                                  f"without the end-of-archive marker (expected at byte {end})")
        if problem == "garbled":
            raise ShardReadError(self.path, end, f"corrupt tar: unreadable member header at byte {end} ({after})")


def _truncation_message(exc: Exception, member, size: int, current: dict | None) -> str:
    last = f"; last sample started: {current['__key__']!r}" if current else ""
    if member is not None and member.offset_data + member.size > size:
        return (f"truncated tar: member {member.name!r} needs bytes {member.offset_data}-"
                f"{member.offset_data + member.size} but the file ends at byte {size}{last}")
    return f"unreadable tar ({exc}), file is {size} bytes{last}"

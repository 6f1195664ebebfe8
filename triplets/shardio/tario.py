"""Tar bytes in and out: the one reproducible writer and the one streaming reader.

Writing: :func:`open_tar_writer` is webdataset's ``TarWriter`` with fixed mtime, uid/gid, user/group names and mode,
so the same samples in the same order always give the same bytes.

Reading: :class:`TarStream` reads a tar once, front to back (``tarfile`` streaming mode: memory holds one sample),
from a local path, any fsspec URL or a ``pipe:`` command; it groups members into WebDataset samples
(``{"__key__": key, suffix: bytes}``, members of a sample contiguous), hashes every byte and checks the
end-of-archive marker — ``tarfile`` silently stops at a tar cut on a 512-byte boundary or at a garbled header, so a
missing marker is the only sign of those truncations. Oddities that do not stop reading (a member without extension,
a repeated suffix, an oversized member, a non-UTF-8 name) go to ``on_problem``; damage that does raises
:class:`ShardReadError`. What a caller does about either is its policy (inspect reports, the loader skips).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

from cnc.base.errors import UserError
from cnc.base.location import resolve
from triplets.sample import TripletSample, decode_sample, encode_sample
from triplets.shardio.names import split_member

#: Fixed tar member mtime (2024-01-01T00:00:00Z) so identical samples give identical bytes.
FIXED_MTIME = 1704067200.0
#: Tar block size; an archive ends with two zero blocks (the end-of-archive marker).
TAR_BLOCK = 512
#: Default cap on one member's size when reading (a shard member is at most a few MB).
MAX_MEMBER_BYTES = 256 << 20


def open_tar_writer(fileobj: IO[bytes]):
    """``webdataset.TarWriter`` with the reproducible settings (samples are pre-encoded: ``encoder=False``)."""
    import webdataset as wds

    return wds.TarWriter(fileobj, encoder=False, mtime=FIXED_MTIME, user="cnc", group="cnc", mode=0o644)


class HashingFile:
    """A binary file wrapper that hashes (sha256) and counts what is written through it, so a streamed tar's
    digest is known when it is closed without reading the file back."""

    def __init__(self, fileobj: IO[bytes]):
        self._file, self._hash, self.nbytes = fileobj, hashlib.sha256(), 0

    def write(self, data) -> int:
        self._hash.update(data)
        self.nbytes += len(data)
        return self._file.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed


def encode_tar(samples: list[TripletSample], jpeg_quality: int = 95) -> bytes:
    """Serialise samples into reproducible tar bytes (same samples → same bytes)."""
    buf = io.BytesIO()
    writer = open_tar_writer(buf)
    try:
        for s in samples:
            writer.write(encode_sample(s, jpeg_quality))
    finally:
        writer.close()
    return buf.getvalue()


def write_shard(url, samples: list[TripletSample], jpeg_quality: int = 95) -> dict:
    """Atomically write ``samples`` as the tar ``url`` (path or fsspec URL); returns ``{nsamples, bytes, sha256}``."""
    data = encode_tar(samples, jpeg_quality)
    resolve(url).write_bytes(data)
    return {"nsamples": len(samples), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def tar_member_end(member: tarfile.TarInfo) -> int:
    """Byte offset just past ``member``'s data, padded to the next tar block."""
    return member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK


class ShardReadError(Exception):
    """A tar cannot be read to its end (truncated or corrupt).

    Args:
        path: the tar.
        offset: byte offset where reading failed.
        message: what went wrong, without the path.
    """

    def __init__(self, path: str, offset: int, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.offset, self.message = str(path), offset, message


class _CountingReader:
    """Read-only stream wrapper: counts bytes, hashes them (sha256) and keeps the last ``keep`` bytes, so the
    end-of-archive marker can be checked afterwards without seeking (pipes, object stores)."""

    def __init__(self, f, keep: int = 1 << 15) -> None:
        self._f, self.keep, self.pos, self.tail = f, keep, 0, b""
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.pos += len(data)
        self.sha.update(data)
        self.tail = (self.tail + data)[-self.keep:]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def end_marker_problem(self, end: int) -> str | None:
        """``None`` if two zero blocks follow byte ``end``; ``"missing"`` if the stream ends before them;
        ``"garbled"`` if non-zero bytes stand there."""
        if self.pos - end < 2 * TAR_BLOCK:
            return "missing"
        start = end - (self.pos - len(self.tail))
        marker = self.tail[start:start + 2 * TAR_BLOCK] if start >= 0 else b""
        return None if len(marker) == 2 * TAR_BLOCK and not marker.strip(b"\0") else "garbled"


def open_stream(url: str) -> IO[bytes]:
    """A binary stream for a shard: local path, ``file://``, any fsspec URL or ``pipe:cmd``."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return resolve(url).open("rb")


class TarStream:
    """One streaming pass over a tar.

    Iterate :meth:`samples` to get WebDataset-style dicts ``{"__key__": key, suffix: bytes}``; afterwards
    :attr:`sha256` and :attr:`nbytes` describe the whole stream.

    Args:
        url: local path, fsspec URL or ``pipe:`` command.
        on_problem: called with a message for member-level oddities that do not stop reading.
        max_member_bytes: members larger than this are skipped (reported), never read into memory.
        size: the stream's size (default: asked from the filesystem; unknown for ``pipe:``), for truncation messages.

    Raises (from :meth:`samples`):
        ShardReadError: the tar ends early or holds a garbled header; the message names the byte offset.
    """

    def __init__(self, url: str, on_problem: Callable[[str], None] | None = None,
                 max_member_bytes: int = MAX_MEMBER_BYTES, size: int | None = None):
        self.url = str(url)
        self.on_problem = on_problem or (lambda msg: None)
        self.max_member_bytes = max_member_bytes
        self.size = size
        self.sha256: str | None = None
        self.nbytes = 0

    def samples(self) -> Iterator[dict]:
        """The samples, in tar order (members of a sample must be contiguous, as WebDataset requires)."""
        return self._read(with_data=True)

    def keys(self) -> Iterator[str]:
        """The sample keys, in tar order, without keeping any member's bytes (the same checks as :meth:`samples`)."""
        for sample in self._read(with_data=False):
            yield sample["__key__"]

    def _read(self, with_data: bool) -> Iterator[dict]:
        try:
            raw = open_stream(self.url)
        except (OSError, UserError) as exc:
            raise ShardReadError(self.url, 0, f"cannot open: {exc}") from None
        if self.size is None and not self.url.startswith("pipe:"):
            self.size = getattr(raw, "size", None)
            if self.size is None:
                self.size = resolve(self.url).size()
        with raw:
            reader = _CountingReader(raw)
            current: dict | None = None
            member, end, compressed = None, 0, False
            try:
                with tarfile.open(fileobj=reader, mode="r|*") as tf:
                    comptype = getattr(tf.fileobj, "comptype", "tar")
                    compressed = comptype != "tar"
                    if compressed:
                        self.on_problem(f"the tar is {comptype}-compressed: shards are plain tars (indexed readers "
                                        f"such as wids seek into them)")
                    for member in tf:
                        end = tar_member_end(member)
                        tf.members = []  # streaming: keep no TarInfo list
                        if member.issym() or member.islnk():
                            kind = "symlink" if member.issym() else "hard link"
                            self.on_problem(f"member {_printable(member.name)!r} is a {kind} to "
                                            f"{_printable(member.linkname)!r}: readers ignore links (shards hold "
                                            f"regular files only)")
                        if not member.isreg():
                            continue
                        name = _printable(member.name)
                        if name != member.name:
                            self.on_problem(f"member name {name!r} is not valid UTF-8 (skipped)")
                            continue
                        if member.size > self.max_member_bytes:
                            self.on_problem(f"member {name!r} is {member.size} bytes, over the limit of "
                                            f"{self.max_member_bytes} (max_member_bytes); not read")
                            continue
                        key, suffix = split_member(name)
                        if key is None:
                            self.on_problem(f"member {name!r} has no extension (ignored by readers)")
                            continue
                        data = tf.extractfile(member).read() if with_data else b""
                        if current is not None and key != current["__key__"]:
                            yield current
                            current = None
                        if current is None:
                            current = {"__key__": key}
                        if suffix in current:
                            self.on_problem(f"key {key!r}: member {name!r} repeats suffix {suffix!r}")
                        current[suffix] = data
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise ShardReadError(self.url, reader.pos,
                                     _truncation_message(exc, member, self.size, current)) from None
            if current is not None:
                yield current
            reader.drain()
            self.sha256, self.nbytes = reader.sha.hexdigest(), reader.pos
            problem = None if compressed else reader.end_marker_problem(end)  # compressed: offsets differ
        size = self.nbytes
        after = f"after the last sample {current['__key__']!r}" if current else "at the start"
        if problem == "missing":
            raise ShardReadError(self.url, size, f"truncated tar: file ends at byte {size}, {after}, "
                                                 f"without the end-of-archive marker (expected at byte {end})")
        if problem == "garbled":
            raise ShardReadError(self.url, end, f"corrupt tar: unreadable member header at byte {end} ({after})")


def _printable(name: str) -> str:
    """``name`` with undecodable bytes (tarfile's surrogate escapes) shown as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _truncation_message(exc: Exception, member, size: int | None, current: dict | None) -> str:
    last = f"; last sample started: {current['__key__']!r}" if current else ""
    if member is not None and size is not None and member.offset_data + member.size > size:
        return (f"truncated tar: member {member.name!r} needs bytes {member.offset_data}-"
                f"{member.offset_data + member.size} but the file ends at byte {size}{last}")
    return f"unreadable tar ({exc}){f', file is {size} bytes' if size is not None else ''}{last}"


def iter_raw_samples(spec, on_problem: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Raw ``{__key__, suffix: bytes}`` dicts of the shards named by ``spec`` (see :func:`resolve_shards`).

    Raises:
        ShardReadError: a tar is truncated or corrupt.
    """
    from triplets.shardio.resolve import resolve_shards

    for url in resolve_shards(spec):
        yield from TarStream(url, on_problem).samples()


def iter_samples(spec) -> Iterator[TripletSample]:
    """Decoded :class:`~triplets.sample.TripletSample` objects of the shards named by ``spec``."""
    for raw in iter_raw_samples(spec):
        yield decode_sample(raw)


def tar_keys(url: str) -> list[str]:
    """Sample keys of one tar, in order (member bytes are not kept).

    Raises:
        ShardReadError: the tar is truncated or corrupt.
    """
    return list(TarStream(url).keys())

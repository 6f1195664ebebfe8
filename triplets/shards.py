"""Reading and writing shards of triplet samples.

Writing is byte-reproducible and atomic: :func:`write_shard` writes ``NAME.tar.tmp`` with
webdataset's ``TarWriter`` (fixed mtime, uid/gid, user/group names and mode; samples in the
given order, members of a sample contiguous), fsyncs it and renames it to ``NAME.tar``.
Readers never see a partial ``.tar`` (the temporary name does not end in ``.tar``).

Reading goes through webdataset (:func:`iter_raw_samples`) and the project's decoder
(:func:`iter_samples`): depth stays 16-bit, masks stay binary.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Iterator

from triplets.sample import TripletSample, decode_sample, encode_sample

#: Fixed tar member mtime (2024-01-01T00:00:00Z) so identical samples give identical bytes.
FIXED_MTIME = 1704067200.0


def fsync_replace(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it onto ``final`` and fsync the directory (atomic on one filesystem)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    try:
        dfd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - directories cannot be fsynced on some filesystems
        pass


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    fsync_replace(tmp, path)
    return path


def encode_tar(samples: list[TripletSample], jpeg_quality: int = 95) -> bytes:
    """Serialise samples into reproducible tar bytes (same samples → same bytes)."""
    import webdataset as wds

    buf = io.BytesIO()
    writer = wds.TarWriter(buf, encoder=False, mtime=FIXED_MTIME, user="cnc", group="cnc", mode=0o644)
    try:
        for s in samples:
            writer.write(encode_sample(s, jpeg_quality))
    finally:
        writer.close()
    return buf.getvalue()


def write_shard(path: str | Path, samples: list[TripletSample], jpeg_quality: int = 95) -> dict:
    """Atomically write ``samples`` to the tar ``path``; returns ``{nsamples, bytes, sha256}``."""
    path = Path(path)
    data = encode_tar(samples, jpeg_quality)
    atomic_write_bytes(path, data)
    return {"nsamples": len(samples), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Tar block size; an archive ends with two zero blocks (the end-of-archive marker).
TAR_BLOCK = 512


def tar_member_end(member: tarfile.TarInfo) -> int:
    """Byte offset just past ``member``'s data, padded to the next tar block."""
    return member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK


class TarTailReader:
    """Read-only stream wrapper for a one-pass tar read: counts bytes, hashes them (sha256) and keeps the last
    ``keep`` bytes, so the end-of-archive marker can be checked afterwards without seeking (pipes, object stores).

    ``tarfile`` silently accepts a tar cut between two members; :meth:`end_marker_problem` catches that.
    """

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
        """Read to the end of the stream (call before :meth:`end_marker_problem` and ``sha.hexdigest()``)."""
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


def iter_raw_samples(url: str, handler=None) -> Iterator[dict]:
    """Raw ``{__key__, suffix: bytes}`` dicts of one tar (or brace pattern), via webdataset."""
    import webdataset as wds

    kwargs = {"handler": handler} if handler is not None else {}
    pipeline = wds.DataPipeline(wds.SimpleShardList(url), wds.tarfile_to_samples(**kwargs))
    yield from pipeline


def iter_samples(url: str) -> Iterator[TripletSample]:
    """Decoded :class:`TripletSample` objects of one tar (or brace pattern)."""
    for raw in iter_raw_samples(url):
        yield decode_sample(raw)


def tar_member_names(path: str | Path) -> list[str]:
    """Member names of a tar in order (raises ``tarfile.ReadError`` on a truncated tar)."""
    with tarfile.open(path) as tf:
        return tf.getnames()

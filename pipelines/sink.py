"""The shard sink: one shard's streaming tar, committed through the output's protocol.

A :class:`ShardSink` opens a local staging file (:meth:`triplets.shardio.BuildOutput.staging_path`), appends encoded
samples with the reproducible ``TarWriter`` (so a streamed shard is byte-identical to
:func:`triplets.shardio.encode_tar` of the same samples) while hashing what it writes, and on :meth:`commit` closes
the tar and hands it with its sha256 to :meth:`~triplets.shardio.BuildOutput.commit_shard` (tar → errors → marker).
Leaving the ``with`` block without a commit deletes the staging file; nothing partial is ever published. A failed
write (disk full) raises an ``OSError`` that names the staging file, so the shard's one-line reason says where.
"""

from __future__ import annotations

from cnc.base.errors import naming_path
from triplets.shardio import BuildOutput, ShardMarker, ShardStats, open_tar_writer
from triplets.shardio.tario import HashingFile


class ShardSink:
    """Context manager owning shard ``shard``'s staging tar.

    Args:
        output: the build output.
        shard: shard id.
    """

    def __init__(self, output: BuildOutput, shard: int):
        self.output, self.shard = output, shard
        self.path = output.staging_path(shard)
        with naming_path(self.path):
            self._file = HashingFile(open(self.path, "wb"))  # the marker's sha256, computed while streaming
        self._writer = open_tar_writer(self._file)
        self.written = 0

    def write(self, encoded: dict) -> None:
        """Append one encoded sample (``{"__key__": key, suffix: bytes}``)."""
        with naming_path(self.path):  # write() on an open file: ENOSPC would not say which file
            self._writer.write(encoded)
        self.written += 1

    def commit(self, failures: list[dict], stats: ShardStats) -> ShardMarker:
        """Close the tar and commit it with its failure rows and stats; return the marker."""
        with naming_path(self.path):
            self._writer.close()  # ends the archive (a passed-in file stays open)
            self._file.close()
        return self.output.commit_shard(self.shard, self.path, failures, stats, sha256=self._file.hexdigest())

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._file.closed:
            try:
                self._writer.close()  # finish the abandoned tar stream, so it never writes to a closed file later
            except Exception:  # noqa: BLE001 - the file is deleted below anyway
                pass
            try:
                self._file.close()
            except OSError:  # the flush of a full disk: the exception that got us here says why
                pass
        self.path.unlink(missing_ok=True)  # gone after a commit (renamed or uploaded), else the abandoned attempt

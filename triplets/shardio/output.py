"""A build's output location and its exactly-once commit protocol — on local disk and on object stores.

One shard ``N`` lives in three files, made visible in this order (names: :mod:`triplets.shardio.names`; folders
of the legacy layout keep ``errors/`` and the marker beside the tars)::

    OUT/NNNNNN.tar                 the samples: staged whole, then published atomically
    OUT/_cnc/errors/NNNNNN.jsonl   one row per failed sample (empty when none failed)
    OUT/_cnc/NNNNNN_stats.json     the marker, written LAST: the commit point

*Publishing* is what the storage makes atomic: on local disk a temporary name (never ending in ``.tar``) renamed
after fsync; on object stores a completed single or multipart upload under the final name (no rename exists there).
The shard is staged in a local file first (in the output folder locally, in ``scratch_dir`` for object stores), so a
shard is never held whole in memory.

A shard is *committed* when its marker parses, carries the plan's fingerprint and item count, and the tar and the
errors file exist with the tar's size equal to the marker's (one listing, no download). ``verify=True`` also
re-hashes every tar against the marker's sha256. :meth:`BuildOutput.recover` deletes every marker that does not
commit its shard (first), then every shard file the project wrote that has no valid marker, and the project's own
temporaries — and nothing else: a file merely starting with six digits is not ours.

Two drivers never run on one output: locally an ``flock`` on ``OUT/.lock`` (released by the kernel when the holder
dies); on object stores a lease object ``OUT/.lock`` created with a create-if-absent precondition (S3
``If-None-Match``, GCS ``ifGenerationMatch=0``) and refreshed by a heartbeat. A lease whose heartbeat is older than
``lease_seconds``, or whose holder ran on this host and is dead, is taken over. On backends without conditional
writes the lease is check-then-write: two drivers started within one round trip can both take it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cnc.base import jsonio
from cnc.base.errors import OutputBusyError, UserError
from cnc.base.hashing import file_sha256, stream_sha256
from cnc.base.location import TEMP_NAME, Location, fsync_replace, resolve, temp_name
from triplets.shardio import names
from triplets.shardio.records import ErrorRecord, ShardMarker, ShardStats, load_marker, write_errors, write_marker

log = logging.getLogger(__name__)


class OutputNotSharedError(UserError):
    """A worker cannot see the driver's local output folder (multi-node cluster without shared storage)."""


def location_sha256(loc: Location) -> str:
    with loc.open("rb") as f:
        return stream_sha256(f)


class BuildOutput:
    """The output of one build (a local folder or an object-store prefix).

    Args:
        url: path or fsspec URL of the build folder.
        scratch_dir: local folder where shards are staged before upload to an object store (default: the system
            temporary folder). Unused for local outputs, which stage beside the final files.
    """

    def __init__(self, url: str | Location, scratch_dir: str | None = None):
        self.loc = resolve(url)
        self.scratch_dir = scratch_dir
        self._layout: names.Layout | None = None

    @property
    def layout(self) -> names.Layout:
        """:data:`~triplets.shardio.names.CURRENT`, or :data:`~triplets.shardio.names.LEGACY` for a folder built
        before sidecars moved to ``_cnc/`` (decided from one listing, then fixed for this object)."""
        if self._layout is None:
            self._layout = names.layout_of(self.loc.list())
        return self._layout

    @property
    def meta(self) -> Location:
        """The folder of the sidecars (``OUT/_cnc``; ``OUT`` itself in the legacy layout)."""
        return self.loc.child(self.layout.meta) if self.layout.meta else self.loc

    # -- names ----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.loc.url

    @property
    def name(self) -> str:
        return self.loc.name

    def tar(self, shard: int) -> Location:
        return self.loc.child(names.tar_name(shard))

    def marker(self, shard: int) -> Location:
        return self.loc.child(self.layout.marker(shard))

    def errors(self, shard: int) -> Location:
        return self.loc.child(self.layout.errors(shard))

    def file(self, name: str) -> Location:
        """A sidecar (``names.PLAN_FILE``, ``MANIFEST_FILE``, ``CONFIG_FILE``, ``CARD_FILE``) where this folder's
        layout keeps it; any other name relative to the folder."""
        if name in (names.PLAN_FILE, names.MANIFEST_FILE, names.CONFIG_FILE, names.CARD_FILE):
            return self.loc.child(self.layout.sidecar(name))
        return self.loc.child(name)

    # -- staging and commit ---------------------------------------------------------------------------------
    def staging_path(self, shard: int) -> Path:
        """A fresh local path to stream shard ``shard``'s tar into before :meth:`commit_shard`."""
        if self.loc.is_local:
            folder = self.loc.local_path()
        else:
            folder = Path(self.scratch_dir or tempfile.gettempdir()) / "cnc-staging"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / temp_name(names.tar_name(shard))

    def commit_shard(self, shard: int, staged: Path, failures: list[ErrorRecord | dict], stats: ShardStats,
                     sha256: str | None = None) -> ShardMarker:
        """Publish the staged tar, then its errors, then the marker (the commit point); return the marker.

        The marker is ``stats`` plus the tar's ``url``, ``bytes``, ``sha256`` and the ``errors`` file; ``sha256`` is
        the staged file's digest when the writer already computed it while streaming (else it is read back and
        hashed).
        """
        final = self.tar(shard)
        marker = ShardMarker.committed(stats, final.name, staged.stat().st_size, sha256 or file_sha256(staged),
                                       self.layout.errors(shard))
        final.upload(staged, move=True)  # 1. the tar
        write_errors(self.errors(shard), failures)  # 2. its failures
        write_marker(self.marker(shard), marker)  # 3. the marker: commit point
        return marker

    # -- reading markers ------------------------------------------------------------------------------------
    def read_marker(self, shard: int) -> ShardMarker | None:
        """Shard ``shard``'s marker; ``None`` when missing or unreadable."""
        try:
            return load_marker(self.marker(shard))
        except (OSError, ValueError):
            return None

    def markers(self) -> dict[int, ShardMarker]:
        """Markers present (not verified; for reports after :meth:`recover`)."""
        shards = sorted(s for n in self.meta.list() if names.is_marker(n) and (s := names.shard_of(n)) is not None)
        with ThreadPoolExecutor(8) as pool:
            found = dict(zip(shards, pool.map(self.read_marker, shards)))
        return {s: m for s, m in found.items() if m is not None}

    # -- recovery -------------------------------------------------------------------------------------------
    def recover(self, fingerprint: str, shard_sizes: dict[int, int], verify: bool = False,
                threads: int = 8) -> dict[int, ShardMarker]:
        """Bring the output back to a committed-only state; return ``{shard: marker}`` of committed shards.

        Args:
            fingerprint: the plan fingerprint every marker must carry.
            shard_sizes: shard id → number of planned items.
            verify: also re-hash every committed tar (downloads every shard on object stores).
            threads: parallel marker reads / hashes.
        """
        lay = self.layout
        top, errs = self.loc.list(), self.loc.child(lay.errors_dir).list()
        meta = self.meta.list() if lay.meta else top
        markers = sorted(names.shard_of(n) for n in meta if names.is_marker(n))

        def check(shard: int) -> tuple[int, ShardMarker | None, str | None]:
            marker = self.read_marker(shard)
            return shard, marker, self._marker_problem(shard, marker, fingerprint, shard_sizes.get(shard), top,
                                                       errs, verify)

        committed: dict[int, ShardMarker] = {}
        removed: list[str] = []
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for shard, marker, problem in pool.map(check, markers):
                if problem is None:
                    committed[shard] = marker  # type: ignore[assignment]
                else:
                    log.warning("shard %s is not committed (%s); it will be rebuilt", names.shard_name(shard), problem)
                    self.marker(shard).rm()  # the marker goes first
                    removed.append(self.layout.marker(shard))
        for folder, entries, kinds in self._owned_folders(top, meta, errs):
            for name in sorted(entries):
                owned = names.owned_shard_file(name, kinds)
                if owned is None and not (folder == lay.meta and names.owned_temp_file(name)):
                    continue
                if owned is not None and owned[0] in committed and not owned[1]:
                    continue
                rel = f"{folder}/{name}" if folder else name
                if rel in removed:
                    continue
                self.loc.child(folder, name).rm()
                removed.append(rel)
        if removed:
            log.info("recovery removed %d uncommitted file(s) in %s", len(removed), self.url)
        return committed

    def _marker_problem(self, shard: int, marker: ShardMarker | None, fingerprint: str, nitems: int | None,
                        top: dict[str, dict], errs: dict[str, dict], verify: bool) -> str | None:
        """Why a marker does not commit its shard (``None`` when it does)."""
        if marker is None:
            return "unreadable marker"
        if marker.fingerprint != fingerprint:
            return "marker from another plan"
        if nitems is None:
            return "shard not in the plan"
        if marker.nitems != nitems:
            return f"marker counts {marker.nitems} items, plan has {nitems}"
        tar = top.get(names.tar_name(shard))
        if tar is None:
            return "tar missing"
        if self.layout.errors(shard).rsplit("/", 1)[1] not in errs:
            return "errors file missing"
        if tar.get("size") != marker.bytes:
            return f"tar size {tar.get('size')} != marker {marker.bytes}"
        if verify and location_sha256(self.tar(shard)) != marker.sha256:
            return "tar sha256 differs from marker"
        return None

    def _owned_folders(self, top: dict, meta: dict, errs: dict) -> list[tuple[str, dict, str]]:
        """``(folder, listing, kinds of shard files there)`` of every folder the build writes into."""
        lay = self.layout
        if not lay.meta:
            return [("", top, "tar,marker"), (lay.errors_dir, errs, "errors")]
        return [("", top, "tar"), (lay.meta, meta, "marker"), (lay.errors_dir, errs, "errors")]

    def remove_temp_files(self) -> list[str]:
        """Delete the project's own temporaries here (only while no worker writes)."""
        removed = []
        lay = self.layout
        listings = self._owned_folders(self.loc.list(), self.meta.list() if lay.meta else {},
                                       self.loc.child(lay.errors_dir).list())
        for folder, entries, kinds in listings:
            for name in entries:
                if TEMP_NAME.match(name) and (names.owned_shard_file(name, kinds) or names.owned_temp_file(name)):
                    self.loc.child(folder, name).rm()
                    removed.append(name)
        return removed

    # -- shared-storage probe -------------------------------------------------------------------------------
    def write_probe(self) -> str | None:
        """Local outputs: write ``OUT/.probe-<id>`` for workers to look for; returns its path (``None`` remote)."""
        if not self.loc.is_local:
            return None
        probe = self.loc.child(f"{names.PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        probe.write_text(socket.gethostname())
        return probe.url

    def remove_probes(self) -> None:
        for name in self.loc.list():
            if name.startswith(names.PROBE_PREFIX):
                self.loc.child(name).rm()

    # -- lock -----------------------------------------------------------------------------------------------
    def lock(self, lease_seconds: float = 120.0) -> OutputLock | LeaseLock:
        return OutputLock(self.loc.local_path()) if self.loc.is_local else LeaseLock(self.loc.child(names.LOCK_FILE),
                                                                                     lease_seconds)


def check_probe(probe: str | None) -> None:
    """Worker side of the shared-storage check (raises :class:`OutputNotSharedError`)."""
    if probe is not None and not os.path.exists(probe):
        raise OutputNotSharedError(
            f"the output folder {os.path.dirname(probe)} is not visible on worker node {socket.gethostname()}: on a "
            f"multi-node cluster the output must be shared storage every node mounts, or an object-store URL "
            f"(s3://..., gs://...)")


class OutputLock:
    """Exclusive ``flock`` on ``OUT/.lock`` (local outputs). The kernel releases it when the holder dies."""

    def __init__(self, output: Path):
        self.path = output / names.LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl  # lazy: POSIX only (the module imports on any platform)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise OutputBusyError(f"another `cnc build` is running on {self.path.parent} (lock {self.path})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LeaseLock:
    """A lease object on an object store (see the module docstring).

    Args:
        loc: the lease object (``OUT/.lock``).
        lease_seconds: a lease not refreshed for this long is stale and may be taken over.
        clock: time source (tests).
    """

    def __init__(self, loc: Location, lease_seconds: float = 120.0, clock: Callable[[], float] = time.time):
        self.loc, self.lease_seconds, self.clock = loc, lease_seconds, clock
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": self.clock()}).encode()

    def _stale(self, held: dict) -> str | None:
        age = self.clock() - float(held.get("heartbeat", 0))
        if held.get("host") == self.owner["host"] and isinstance(held.get("pid"), int) and not _pid_alive(held["pid"]):
            return f"its holder (pid {held['pid']} on this host) is gone"
        if age > self.lease_seconds:
            return f"its heartbeat is {age:.0f} s old (lease {self.lease_seconds:.0f} s)"
        return None

    def __enter__(self) -> LeaseLock:
        for _ in range(2):
            if self.loc.create_exclusive(self._body()):
                break
            try:
                held = jsonio.loads(self.loc.read_bytes(), what="lock")
            except (OSError, ValueError):
                held = {}
            why = self._stale(held)
            if why is None:
                raise OutputBusyError(
                    f"another `cnc build` holds {self.loc.url} (host {held.get('host')}, pid {held.get('pid')}, "
                    f"heartbeat {self.clock() - float(held.get('heartbeat', 0)):.0f} s ago); if it is dead, wait "
                    f"{self.lease_seconds:.0f} s for its lease to expire")
            log.warning("taking over the lease %s: %s", self.loc.url, why)
            self.loc.rm()
        else:
            raise OutputBusyError(f"another `cnc build` took the lease {self.loc.url} at the same time")
        if not self.loc.exclusive_create:
            log.warning("%s: this storage has no create-if-absent writes; two builds started at the same instant "
                        "could both take the lease", self.loc.url)
        self._thread = threading.Thread(target=self._heartbeat, name="cnc-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(1.0, self.lease_seconds / 4)):
            try:
                self.loc.write_bytes(self._body())
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried on the next tick
                log.warning("lease heartbeat on %s failed: %s", self.loc.url, exc)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            held = jsonio.loads(self.loc.read_bytes(), what="lock")
            if held.get("id") == self.owner["id"]:
                self.loc.rm()
        except (OSError, ValueError):
            pass


__all__ = ["BuildOutput", "LeaseLock", "OutputLock", "OutputNotSharedError", "check_probe", "file_sha256",
           "fsync_replace"]

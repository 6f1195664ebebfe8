"""Output folder layout and the shard commit protocol (standards S3-S5).

One shard ``N`` of a build lives in three files, written in this order::

    OUTPUT/NNNNNN.tar            samples (temp + fsync + rename)
    OUTPUT/errors/NNNNNN.jsonl   one row per failed sample (temp + rename; empty when none failed)
    OUTPUT/NNNNNN_stats.json     the marker, written LAST (temp + rename): the commit point

A shard is *committed* when its marker exists, parses, belongs to the current plan and the
tar's size and sha256 equal the marker's. Everything else with a shard name is garbage of an
interrupted attempt: :func:`recover` deletes it (marker first, so a crash during recovery
leaves nothing half-trusted) together with every ``*.tmp`` file, and reports which shards are
committed. Temporary names end in ``.tmp`` (never ``.tar``), so shard globs never see them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from triplets.shards import file_sha256, fsync_replace

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
ERRORS_DIR = "errors"
_SHARD_FILE = re.compile(r"^(\d{6})(?:[._].*)?$")


def shard_name(shard: int) -> str:
    """``7`` → ``"000007"`` (brace-expandable: ``{000000..000041}.tar``)."""
    return f"{shard:06d}"


def tar_path(output: Path, shard: int) -> Path:
    return output / f"{shard_name(shard)}.tar"


def errors_path(output: Path, shard: int) -> Path:
    return output / ERRORS_DIR / f"{shard_name(shard)}.jsonl"


def marker_path(output: Path, shard: int) -> Path:
    return output / f"{shard_name(shard)}_stats.json"


def temp_path(final: Path) -> Path:
    """A unique temporary name beside ``final`` (``000003.tar.<hex>.tmp``): two attempts never share one."""
    return final.with_name(f"{final.name}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` through a unique temporary file, fsync, rename."""
    tmp = temp_path(path)
    tmp.write_text(text, encoding="utf-8")
    fsync_replace(tmp, path)
    return path


def write_json(path: Path, obj: object, indent: int | None = 1) -> Path:
    """Atomically write ``obj`` as sorted-key JSON."""
    return atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False) + "\n")


def commit_shard(output: Path, shard: int, tar_tmp: Path, failures: list[dict], stats: dict) -> dict:
    """Commit one shard: rename the finished temporary tar, write its errors, then the marker.

    Args:
        output: the build folder.
        shard: shard id.
        tar_tmp: the complete, closed temporary tar (same folder as the final tar).
        failures: error rows ``{key, source, stage, reason}``.
        stats: marker fields; ``bytes``, ``sha256``, ``url`` and ``errors`` are filled in here.

    Returns:
        The marker dict as written.
    """
    final = tar_path(output, shard)
    stats = dict(stats, url=final.name, bytes=tar_tmp.stat().st_size, sha256=file_sha256(tar_tmp),
                 errors=f"{ERRORS_DIR}/{final.stem}.jsonl")
    fsync_replace(tar_tmp, final)  # 1. the tar
    errs = errors_path(output, shard)
    errs.parent.mkdir(exist_ok=True)
    atomic_write_text(errs, "".join(json.dumps(f, sort_keys=True, ensure_ascii=False) + "\n" for f in failures))  # 2.
    write_json(marker_path(output, shard), stats)  # 3. the marker: commit point
    return stats


def read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _marker_problem(output: Path, shard: int, marker: dict | None, fingerprint: str, nitems: int | None,
                    verify_checksums: bool) -> str | None:
    """Why a marker does not commit its shard (None when it does)."""
    if marker is None:
        return "unreadable marker"
    if marker.get("fingerprint") != fingerprint:
        return "marker from another plan"
    if nitems is None:
        return "shard not in the plan"
    if marker.get("nitems") != nitems:
        return f"marker counts {marker.get('nitems')} items, plan has {nitems}"
    tar, errs = tar_path(output, shard), errors_path(output, shard)
    if not tar.is_file():
        return "tar missing"
    if not errs.is_file():
        return "errors file missing"
    if tar.stat().st_size != marker.get("bytes"):
        return f"tar size {tar.stat().st_size} != marker {marker.get('bytes')}"
    if verify_checksums and file_sha256(tar) != marker.get("sha256"):
        return "tar sha256 differs from marker"
    return None


def recover(output: Path, fingerprint: str, shard_sizes: dict[int, int], verify_checksums: bool = True,
            threads: int = 8) -> dict[int, dict]:
    """Bring ``output`` back to a committed-only state and return ``{shard: marker}`` of committed shards.

    Deletes every ``*.tmp``, every marker that does not commit its shard (wrong plan, missing or
    changed tar), then every shard-named file (``NNNNNN.*`` here and in ``errors/``) without a
    valid marker.

    Args:
        output: the build folder.
        fingerprint: the plan fingerprint every marker must carry.
        shard_sizes: shard id → number of planned items.
        verify_checksums: re-hash every committed tar (reads all shards; size is always checked).
        threads: parallel hashing threads.
    """
    removed: list[str] = remove_temp_files(output)

    def _rm(p: Path) -> None:
        p.unlink(missing_ok=True)
        removed.append(str(p.relative_to(output)))

    folders = [output, output / ERRORS_DIR]
    markers = {int(p.name[:6]): p for p in sorted(output.glob("[0-9][0-9][0-9][0-9][0-9][0-9]_stats.json"))}

    def _check(item: tuple[int, Path]) -> tuple[int, dict | None, str | None]:
        shard, path = item
        marker = read_marker(path)
        return shard, marker, _marker_problem(output, shard, marker, fingerprint, shard_sizes.get(shard),
                                              verify_checksums)

    committed: dict[int, dict] = {}
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for shard, marker, problem in pool.map(_check, markers.items()):
            if problem is None:
                committed[shard] = marker  # type: ignore[assignment]
            else:
                log.warning("shard %s is not committed (%s); it will be rebuilt", shard_name(shard), problem)
                _rm(markers[shard])  # the marker goes first
    for folder in folders:
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                m = _SHARD_FILE.match(p.name)
                if p.is_file() and m and int(m.group(1)) not in committed:
                    _rm(p)
    if removed:
        log.info("recovery removed %d uncommitted file(s) in %s", len(removed), output)
    return committed


def remove_temp_files(output: Path) -> list[str]:
    """Delete every ``*.tmp`` in ``output`` and ``output/errors`` (only while no worker writes there)."""
    removed = []
    for folder in (output, output / ERRORS_DIR):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
                    removed.append(str(p.relative_to(output)))
    return removed


def committed_markers(output: Path) -> dict[int, dict]:
    """Markers present in ``output`` (no verification; for reporting after :func:`recover`)."""
    out = {}
    for p in sorted(output.glob("[0-9][0-9][0-9][0-9][0-9][0-9]_stats.json")):
        marker = read_marker(p)
        if marker is not None:
            out[int(p.name[:6])] = marker
    return out


class OutputLock:
    """Exclusive ``flock`` on ``OUTPUT/.lock`` so two drivers never recover/build one folder at once.

    The kernel releases it when the holder dies (``kill -9`` included). Advisory only; not
    reliable on every network filesystem.
    """

    def __init__(self, output: Path):
        self.path = output / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

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


class OutputBusyError(RuntimeError):
    """The output folder is locked by another running build."""

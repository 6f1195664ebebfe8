"""Typed build records: one type, one writer and one reader for every record a build keeps about its shards.

==================  ==============================================  ==============================================
record              where                                           written / read by
==================  ==============================================  ==============================================
:class:`ShardStats`   what a worker (or ``cnc filter|score``)        built by the worker and :mod:`pipelines.derive`,
                      measured about one shard                       committed by :meth:`BuildOutput.commit_shard`
:class:`ShardMarker`  ``OUT/_cnc/NNNNNN_stats.json``: the stats +    :func:`write_marker` (in the commit) /
                      the committed tar's url, bytes, sha256         :func:`load_marker` (build, derive, inspect,
                                                                     loader)
:class:`ErrorRecord`  ``OUT/_cnc/errors/NNNNNN.jsonl``, one line per  :func:`write_errors` (in the commit) /
                      failed sample                                  :func:`read_errors` (inspect)
:class:`ManifestHeader`  ``OUT/_cnc/manifest.json``'s wids shard      :func:`write_manifest` / :func:`read_manifest`
                      index, built from the committed markers        (build, derive, tiny shards, the dataset card)
==================  ==============================================  ==============================================

Markers are read leniently, because ``cnc inspect`` also reads folders written by other tools (img2dataset's
``NNNNN_stats.json`` count samples under ``count``): every field is optional, a field of the wrong type reads as
``None``, and the sample count, seconds and per-stage seconds are also found under their common other names
(:data:`ALIASES`). Written markers hold exactly the fields that are set, in sorted-key JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cnc.base import jsonio
from cnc.base.location import Location

#: Distinct failure reasons kept per marker (the rest are counted under ``"<other>"``).
MAX_REASONS = 100
#: Other names under which foreign markers keep a field (first present wins).
ALIASES: dict[str, tuple[str, ...]] = {
    "nsamples": ("nsamples", "count", "num_samples", "samples"),
    "seconds": ("seconds", "duration", "duration_s", "elapsed", "wall_seconds"),
    "stage_seconds": ("stage_seconds", "stages", "seconds_by_stage", "timings"),
    "failures_by_reason": ("failures_by_reason", "failures"),
}
WIDS_KIND = "wids-shard-index-v1"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fits(value: Any, hint: str) -> bool:
    """Whether a JSON value fits a field annotated ``hint`` (``int | None``, ``dict[str, int] | None``...)."""
    if hint.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if hint.startswith("float"):
        return _number(value)
    if hint.startswith("str"):
        return isinstance(value, str)
    if hint.startswith("dict"):
        return isinstance(value, dict)
    return False


class _Record:
    """JSON (de)serialisation shared by the record dataclasses: ``None`` fields are left out when written, and
    values of the wrong type read as ``None``."""

    def to_json(self) -> dict:
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_json(cls, data: dict):
        hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        values = {}
        for name, hint in hints.items():
            for key in ALIASES.get(name, (name,)):
                v = data.get(key)
                if v is not None and _fits(v, hint):
                    values[name] = float(v) if hint.startswith("float") else v
                    break
        return cls(**values)


@dataclass
class ShardStats(_Record):
    """What one attempt measured about one shard: the marker's body before the commit adds the tar's identity.

    ``nitems`` planned items = ``nsamples`` written + ``nfailed`` failed (+ ``ndropped`` for ``cnc filter``).
    Build-only fields: ``attempt``, ``nreused`` (samples copied from the committed tar, ``--retry-failed``),
    ``failures_by_stage``/``failures_by_reason`` (:func:`count_failures`), wall/CPU seconds and times, ``worker``
    (pid, host, device...), ``models`` (config key → identity record). Derived builds: ``ndropped`` /
    ``dropped_by_reason``, ``source`` / ``source_sha256`` (the source shard).
    """

    shard: int | None = None
    name: str | None = None
    fingerprint: str | None = None
    nitems: int | None = None
    nsamples: int | None = None
    nfailed: int | None = None
    seconds: float | None = None
    stage_seconds: dict[str, float] | None = None
    attempt: int | None = None
    nreused: int | None = None
    failures_by_stage: dict[str, int] | None = None
    failures_by_reason: dict[str, int] | None = None
    cpu_seconds: float | None = None
    start_time: str | None = None
    end_time: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: dict | None = None
    models: dict | None = None
    ndropped: int | None = None
    dropped_by_reason: dict[str, int] | None = None
    source: str | None = None
    source_sha256: str | None = None


@dataclass
class ShardMarker(ShardStats):
    """The commit point of a shard (``_cnc/NNNNNN_stats.json``): its :class:`ShardStats` plus the committed tar's
    name (``url``, relative to the build folder), size in ``bytes`` and ``sha256``, and its errors file
    (``errors``, relative to the build folder)."""

    url: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    errors: str | None = None

    @classmethod
    def committed(cls, stats: ShardStats, url: str, nbytes: int, sha256: str, errors: str) -> ShardMarker:
        return cls(**dataclasses.asdict(stats), url=url, bytes=nbytes, sha256=sha256, errors=errors)


def write_marker(loc: Location, marker: ShardMarker) -> None:
    """Write ``marker`` at ``loc`` (atomically: the commit point of its shard)."""
    loc.write_json(marker.to_json())


def load_marker(loc: Location) -> ShardMarker | None:
    """The marker at ``loc``; ``None`` when there is none.

    Raises:
        ValueError: the file is not a JSON object (the message says which).
        OSError: it cannot be read.
    """
    try:
        raw = loc.read_bytes()
    except FileNotFoundError:
        return None
    data = jsonio.loads(raw, what="marker")
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return ShardMarker.from_json(data)


# -- failures -------------------------------------------------------------------------------------------------------
@dataclass
class ErrorRecord(_Record):
    """One failed source item: its ``key``, ``source`` (when known), the ``stage`` that failed and the ``reason``."""

    key: str | None = None
    stage: str | None = None
    reason: str | None = None
    source: str | None = None


def write_errors(loc: Location, failures: Iterable[ErrorRecord | dict]) -> None:
    """Write the failures of one shard as JSON lines (an empty file when none failed)."""
    rows = (f.to_json() if isinstance(f, ErrorRecord) else f for f in failures)
    loc.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def read_errors(loc: Location) -> tuple[list[ErrorRecord], list[int]]:
    """``(records, numbers of the lines that are not JSON objects)`` of an errors file."""
    records, bad = [], []
    for lineno, line in enumerate(loc.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = jsonio.loads(line, what="error row")
        except ValueError:
            row = None
        if isinstance(row, dict):
            records.append(ErrorRecord.from_json(row))
        else:
            bad.append(lineno)
    return records, bad


def count_failures(failures: Iterable[ErrorRecord | dict]) -> tuple[dict[str, int], dict[str, int]]:
    """Failures of one shard by stage and by reason (reasons capped at :data:`MAX_REASONS` distinct values)."""
    rows = [f.to_json() if isinstance(f, ErrorRecord) else f for f in failures]
    by_stage = collections.Counter(f["stage"] for f in rows)
    by_reason = collections.Counter(f["reason"] for f in rows)
    if len(by_reason) > MAX_REASONS:
        top = dict(by_reason.most_common(MAX_REASONS))
        top["<other>"] = sum(by_reason.values()) - sum(top.values())
        by_reason = collections.Counter(top)
    return dict(sorted(by_stage.items())), dict(sorted(by_reason.items()))


@dataclass
class FailureTotals:
    """Failures over many committed shards, from their markers (the one place they are added up)."""

    by_stage: collections.Counter = field(default_factory=collections.Counter)
    by_reason: collections.Counter = field(default_factory=collections.Counter)
    failed: int = 0

    @classmethod
    def of(cls, markers: Iterable[ShardMarker]) -> FailureTotals:
        totals = cls()
        for m in markers:
            totals.by_stage.update(m.failures_by_stage or {})
            totals.by_reason.update(m.failures_by_reason or {})
            totals.failed += m.nfailed or 0
        return totals


# -- manifest -------------------------------------------------------------------------------------------------------
@dataclass
class ShardEntry(_Record):
    """One shard of the wids index: ``url`` relative to the build folder, ``nsamples``, ``filesize``, ``sha256``."""

    url: str | None = None
    nsamples: int | None = None
    filesize: int | None = None
    sha256: str | None = None


@dataclass
class ManifestHeader:
    """The wids shard index that opens ``manifest.json`` (``wids.ShardListDataset(manifest, base=folder)``)."""

    name: str
    shardlist: list[ShardEntry]

    @classmethod
    def of_markers(cls, name: str, markers: Iterable[ShardMarker]) -> ManifestHeader:
        """From the committed markers, in the order given (sort them by shard)."""
        return cls(name, [ShardEntry(m.url, m.nsamples, m.bytes, m.sha256) for m in markers])

    def to_json(self) -> dict:
        return {"__kind__": WIDS_KIND, "wids_version": 1, "name": self.name,
                "shardlist": [e.to_json() for e in self.shardlist]}

    @classmethod
    def from_json(cls, data: dict) -> ManifestHeader:
        rows = data.get("shardlist")
        return cls(str(data.get("name") or ""), [ShardEntry.from_json(r) for r in rows if isinstance(r, dict)]
                   if isinstance(rows, list) else [])


def write_manifest(loc: Location, header: ManifestHeader, body: dict) -> dict:
    """Write ``manifest.json`` at ``loc``: the wids header, then the build's own keys (``config``, ``totals``...).
    Returns the whole manifest."""
    manifest = {**header.to_json(), **body}
    loc.write_json(manifest)
    return manifest


def read_manifest(loc: Location) -> tuple[ManifestHeader, dict]:
    """``(header, whole manifest)`` of ``manifest.json`` at ``loc``.

    Raises:
        FileNotFoundError: there is none. ValueError: it is not a JSON object.
    """
    if not loc.isfile():
        raise FileNotFoundError(f"{loc.url} does not exist")
    data = loc.read_json()
    if not isinstance(data, dict):
        raise ValueError(f"{loc.url}: expected a JSON object, got {type(data).__name__}")
    return ManifestHeader.from_json(data), data


__all__ = ["ALIASES", "MAX_REASONS", "ErrorRecord", "FailureTotals", "ManifestHeader", "ShardEntry", "ShardMarker",
           "ShardStats", "count_failures", "load_marker", "read_errors", "read_manifest", "write_errors",
           "write_manifest", "write_marker"]

"""Validate shards in one streaming pass, summarising and picking samples to show on the way.

Per shard (optionally in worker processes) :func:`scan_shard` reads the tar once and checks that it
reads to its end-of-archive marker, that every sample has every field of the sample format and
decodes to the right dtypes and shapes, that the ``json`` key matches the tar key, and that the
stats marker agrees with the tar (sample count, byte size, sha256). Across shards,
:func:`inspect_shards` checks that keys are unique from 8-byte key hashes (8 bytes per sample held,
never the samples), names the duplicates in a second, header-only pass, and merges the summaries.

The trainer runs the same checks before training on the first few shards::

    result = validate(urls, max_shards=4)
    if not result.ok:
        raise ValueError("\\n".join(map(str, result.errors)))

Size: the single streaming pass of ``cnc inspect``; its checks share one per-shard state, so they stay in one
module.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np

from cnc.base import jsonio
from cnc.base.location import resolve
from triplets.inspect.summary import Summary, failure_reason
from triplets.quality import SCORES, score_value
from triplets.sample import (
    FIELDS,
    KEY_PATTERN,
    LATENT_FIELD,
    TripletSample,
    decode_sample,
    validate_meta,
    validate_sample,
)
from triplets.shardio import ShardMarker, ShardReadError, TarStream, load_marker, resolve_shards
from triplets.shardio.names import (
    LEGACY,
    MANIFEST_FILE,
    PLAN_FILE,
    SIDECAR_DIR,
    errors_for_tar,
    is_marker,
    layout_of,
    marker_candidates,
    marker_for_tar,
    tar_for_marker,
)
from triplets.shardio.records import read_errors
from triplets.shardio.tario import MAX_MEMBER_BYTES

log = logging.getLogger(__name__)
ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Problem:
    """One finding. ``str(problem)`` is a single line: ``ERROR path: [key] message``."""

    path: str
    message: str
    key: str | None = None
    severity: str = ERROR

    def __str__(self) -> str:
        key = f"[{self.key}] " if self.key else ""
        return f"{self.severity.upper()} {self.path}: {key}{' '.join(self.message.split())}"


@dataclass
class ShardCheck:
    """What one shard holds. ``complete`` is False when the tar could not be read to its end."""

    path: str
    nsamples: int = 0
    bytes: int = 0
    sha256: str | None = None
    complete: bool = False
    marker: ShardMarker | None = None


@dataclass
class ValidationResult:
    """Outcome of :func:`validate`.

    Attributes:
        shards: one :class:`ShardCheck` per shard read, in order.
        problems: findings, at most ``max_problems`` of them (``problem_count`` counts all).
    """

    shards: list[ShardCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    error_count: int = 0

    @property
    def nsamples(self) -> int:
        return sum(s.nsamples for s in self.shards)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return self.error_count == 0

    def add(self, problem: Problem, limit: int) -> None:
        self.problem_count += 1
        self.error_count += problem.severity == ERROR
        if len(self.problems) < limit:
            self.problems.append(problem)


@dataclass(frozen=True)
class ScanOptions:
    """What :func:`scan_shard` does besides validating.

    Attributes:
        decode: decode every sample (dtypes, shapes, summary statistics); False checks structure only.
        n / seed: keep the ``n`` samples with the smallest seeded key hash (order-independent sampling).
        keys: keep the samples with these keys instead.
        max_problems: findings kept per shard.
        max_member_bytes: members larger than this are reported and not read.
        worst: keep the ``worst`` samples of each quality score that has a good end (lowest removal, highest
            clip_sim...; see :data:`triplets.quality.SCORES`).
    """

    decode: bool = True
    n: int = 0
    seed: int = 0
    keys: frozenset[str] | None = None
    max_problems: int = 1000
    max_member_bytes: int = MAX_MEMBER_BYTES
    worst: int = 0


def ranked_scores() -> list[str]:
    """Scores with a good end (the ones a worst-k list makes sense for)."""
    return [name for name, sc in SCORES.items() if sc.better]


def badness(name: str, value: float) -> float:
    """Larger = worse for score ``name``."""
    return -value if SCORES[name].better == "high" else value


@dataclass
class ShardScan:
    """Everything one shard contributes: its check, findings, key hashes, summary and picked raw samples."""

    check: ShardCheck
    problems: list[Problem]
    key_hashes: np.ndarray
    summary: Summary
    picked: list[tuple[int, int, dict]]  # (priority, index in shard, raw sample)
    worst: dict[str, list[tuple[float, int, dict]]] = field(default_factory=dict)  # score → (badness, hash, raw)


@dataclass
class InspectResult:
    """Validation, summary and the chosen samples of :func:`inspect_shards`."""

    validation: ValidationResult
    summary: Summary
    samples: list[TripletSample]
    missing_keys: list[str] = field(default_factory=list)
    worst: dict[str, list[tuple[float, TripletSample]]] = field(default_factory=dict)  # score → (value, sample)


def key_hash(key: str, seed: int | None = None) -> int:
    """64-bit hash of a key (with ``seed``: the sampling priority)."""
    text = key if seed is None else f"{seed}\0{key}"
    data = text.encode("utf-8", "surrogateescape")  # a non-UTF-8 member name must not crash the hash
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _check_sample(raw: dict, decode: bool, summary: Summary, report: Callable[[str, str | None], None]) -> None:
    """Field presence, decoding, dtypes/shapes and json consistency of one raw sample."""
    key = raw["__key__"]
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        report(f"missing fields {missing}", key)
        return
    extra = sorted(set(raw) - set(FIELDS) - {"__key__", LATENT_FIELD})
    if extra:
        report(f"unexpected fields {extra}", key, WARNING)
    if not decode:
        if not KEY_PATTERN.match(key):
            report(f"key {key!r} is not dot-free [A-Za-z0-9_/-]", key)
        try:
            meta = jsonio.loads(raw["json"], what="sample json")
        except ValueError as exc:  # incl. UnicodeDecodeError
            report(f"json does not parse: {exc}", key)
            return
        for msg in validate_meta(meta):
            report(msg, key)
        return
    try:
        s = decode_sample(raw)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a finding about this sample, not a crash
        report(f"does not decode: {type(exc).__name__}: {exc}", key)
        return
    for msg in validate_sample(s):
        report(msg, key)
    if s.meta.get("key") not in (None, key):
        report(f"json key {s.meta.get('key')!r} differs from the tar key", key)
    summary.add_sample(s)


def read_json(url: str) -> dict | None:
    """A JSON object at ``url``; ``None`` when missing. Raises ``ValueError`` when it is not an object."""
    loc = resolve(url)
    if not loc.isfile():
        return None
    data = jsonio.loads(loc.read_bytes(), what=_name(url), max_bytes=None)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def _read_failures(tar: str, marker: ShardMarker | None, report: Callable[..., None]) -> Counter:
    """Failure counts by ``"stage: reason"`` from ``errors/NNNNNN.jsonl``, else from the marker."""
    path, counts = resolve(errors_for_tar(tar)), Counter()
    if not path.isfile():
        path = resolve(errors_for_tar(tar, LEGACY))  # a folder of the legacy layout
    if path.isfile():
        records, bad = read_errors(path)
        for row in records:
            counts[failure_reason(row.stage, row.reason)] += 1
        for lineno in bad:
            report(f"{path.name} line {lineno} is not a JSON object", None, WARNING)
    elif marker:
        for reason, n in (marker.failures_by_reason or {}).items():
            if isinstance(n, int):
                counts[failure_reason(None, reason)] += n
    return counts


def _check_marker(tar: str, check: ShardCheck, report: Callable[..., None]) -> None:
    marker = check.marker
    if marker is None:
        folder = resolve(_parent(tar))
        if any(folder.child(d, f).exists() for d in (SIDECAR_DIR, "") for f in (PLAN_FILE, MANIFEST_FILE)):
            report(f"no stats marker {_name(marker_for_tar(tar))}: the shard may come from an unfinished build",
                   None, WARNING)
        return
    if not check.complete:
        return  # the truncation is the finding; counts and hashes cannot agree
    n = marker.nsamples
    if n is None:
        report(f"stats marker {_name(marker_for_tar(tar))} has no sample count", None, WARNING)
    elif n != check.nsamples:
        report(f"stats marker says {n} samples, the tar holds {check.nsamples}")
    sha = marker.sha256
    if sha is not None and sha != check.sha256:
        report(f"stats marker sha256 {str(sha)[:12]}... != tar sha256 {check.sha256[:12]}...")
    size = marker.bytes
    if size is not None and size != check.bytes:
        report(f"stats marker says {size} bytes, the tar has {check.bytes}")


def scan_shard(path: str, opts: ScanOptions = ScanOptions()) -> ShardScan:
    """Validate, summarise and sample one shard (a local path or URL) in one streaming pass."""
    tar = str(path)
    problems: list[Problem] = []

    def report(message: str, key: str | None = None, severity: str = ERROR) -> None:
        if len(problems) < opts.max_problems:
            problems.append(Problem(str(tar), message, key, severity))

    check, summary = ShardCheck(str(tar)), Summary(shards=1)
    for candidate in marker_candidates(tar):  # _cnc/ first, then beside the tar (legacy layout)
        try:
            check.marker = load_marker(resolve(candidate))
        except (ValueError, OSError) as exc:
            report(f"stats marker {_name(candidate)} is not valid JSON: {exc}")
            break
        if check.marker is not None:
            break
    hashes: list[int] = []
    heap: list[tuple[int, int, dict]] = []  # max-heap on priority through negation
    worst: dict[str, list[tuple[float, int, dict]]] = {name: [] for name in ranked_scores()} if opts.worst else {}
    stream = TarStream(tar, on_problem=report, max_member_bytes=opts.max_member_bytes)
    try:
        for i, raw in enumerate(stream.samples()):
            check.nsamples += 1
            hashes.append(key_hash(raw["__key__"]))
            _check_sample(raw, opts.decode, summary, report)
            if opts.keys is not None:
                if raw["__key__"] in opts.keys:
                    heap.append((0, i, raw))
            elif opts.n > 0:
                item = (-key_hash(raw["__key__"], opts.seed), i, raw)
                (heapq.heappush if len(heap) < opts.n else heapq.heappushpop)(heap, item)
            if worst:
                _keep_worst(raw, worst, opts.worst)
        check.complete, check.sha256, check.bytes = True, stream.sha256, stream.nbytes
    except ShardReadError as exc:
        report(exc.message)
    except OSError as exc:
        report(f"cannot read: {exc}")
    summary.bytes = check.bytes or (resolve(tar).size() or 0)
    _check_marker(tar, check, report)
    summary.add_failures(_read_failures(tar, check.marker, report))
    if check.marker:
        summary.throughput.add_marker(check.marker)
    picked = [(-p if opts.keys is None else p, i, raw) for p, i, raw in heap]
    return ShardScan(check, problems, np.array(hashes, dtype=np.uint64), summary, picked, worst)


def _keep_worst(raw: dict, worst: dict[str, list], k: int) -> None:
    """Push ``raw`` into each score's min-heap of the ``k`` worst samples (ties broken by key hash)."""
    try:
        meta = jsonio.loads(raw["json"], what="sample json")
    except (KeyError, ValueError):
        return
    tie = key_hash(raw["__key__"])
    for name, heap in worst.items():
        v = score_value(meta, name)
        if v is None:
            continue
        item = (badness(name, v), -tie, raw)
        (heapq.heappush if len(heap) < k else heapq.heappushpop)(heap, item)


def _duplicate_keys(scans: list[ShardScan]) -> dict[str, list[str]]:
    """Key → shards holding it, for every key seen more than once (a second pass reads tar headers only)."""
    all_hashes = np.concatenate([s.key_hashes for s in scans]) if scans else np.zeros(0, np.uint64)
    uniq, counts = np.unique(all_hashes, return_counts=True)
    dup = set(uniq[counts > 1].tolist())
    if not dup:
        return {}
    where: dict[str, list[str]] = {}
    for scan in scans:
        if not dup.intersection(scan.key_hashes.tolist()):
            continue
        try:
            for key in TarStream(scan.check.path).keys():  # headers only: no member is kept
                if key_hash(key) in dup:
                    where.setdefault(key, []).append(scan.check.path)
        except (ShardReadError, OSError):
            continue  # already reported as unreadable
    return {k: v for k, v in where.items() if len(v) > 1}


def _folder_checks(inputs: Sequence[str], shards: list[str], report: Callable[..., None]) -> None:
    """Build-folder level: markers whose tar is gone; fewer shards than planned."""
    present = set(shards)
    for item in inputs:
        if str(item).startswith("pipe:"):
            continue
        try:
            folder = resolve(str(item))
            if not folder.isdir():
                continue
        except Exception:  # noqa: BLE001 - a glob or pattern, not a folder
            continue
        top = folder.list()
        meta = folder.child(layout_of(top).meta) if layout_of(top).meta else folder
        listing = meta.list() if meta is not folder else top
        for name in sorted(n for n in listing if is_marker(n)):
            tar = folder.child(tar_for_marker(name))
            if tar.url not in present:
                report(folder.url, f"stats marker {name} has no {tar.name}")
        try:
            plan = read_json(meta.child(PLAN_FILE).url) if PLAN_FILE in listing else None
        except (ValueError, OSError):
            plan = None
        planned = None
        if plan:
            planned = len(plan["shards"]) if isinstance(plan.get("shards"), list) else plan.get("num_shards")
        have = sum(1 for p in shards if _parent(p) == folder.url.rstrip("/"))
        if isinstance(planned, int) and have < planned:
            report(folder.url, f"build incomplete: plan.json lists {planned} shards, {have} present", WARNING)


def _scan_all(shards: list[str], opts: ScanOptions, workers: int,
              progress: Callable[[ShardCheck], None] | None) -> Iterator[ShardScan]:
    if workers <= 1 or len(shards) <= 1:
        for path in shards:
            scan = scan_shard(path, opts)
            if progress:
                progress(scan.check)
            yield scan
        return
    # spawn, not fork: safe in a trainer process that already holds CUDA or threads
    with ProcessPoolExecutor(min(workers, len(shards)), mp_context=multiprocessing.get_context("spawn")) as pool:
        for scan in pool.map(scan_shard, shards, repeat(opts)):
            if progress:
                progress(scan.check)
            yield scan


def inspect_shards(paths: str | Path | Sequence[str | Path], *, n: int = 16, seed: int = 0,
                   keys: Iterable[str] | None = None, decode: bool = True, max_shards: int | None = None,
                   workers: int = 1, max_problems: int = 1000, max_member_bytes: int = MAX_MEMBER_BYTES,
                   progress: Callable[[ShardCheck], None] | None = None, worst: int = 0) -> InspectResult:
    """Validate and summarise shards and pick samples to show, in one streaming pass.

    Args:
        paths: build folder(s), glob(s), brace pattern(s) or tar path(s) (see :func:`resolve_shards`).
        n / seed: how many samples to pick; the same seed picks the same keys whatever the worker count.
        keys: pick these keys instead (``missing_keys`` lists those not found).
        decode: decode every sample; False checks structure, markers and keys only (several times faster).
        max_shards: read only the first shards (cheap pre-training check).
        workers: processes reading shards in parallel (spawned: a script calling this with ``workers > 1``
            needs the ``if __name__ == "__main__":`` guard).
        max_problems: findings kept (all are counted).
        max_member_bytes: size cap of one tar member (larger ones are a finding and are not read).
        progress: called with each shard's :class:`ShardCheck` as it finishes.
        worst: also keep the ``worst`` samples of each ranked quality score (``InspectResult.worst``).

    Raises:
        triplets.shardio.ShardSpecError: when ``paths`` name no tar (a :class:`~cnc.base.errors.UserError`).
    """
    inputs = [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
    shards = resolve_shards(inputs)
    if max_shards is not None:
        shards = shards[:max_shards]
    wanted = frozenset(keys) if keys is not None else None
    opts = ScanOptions(decode=decode, n=n, seed=seed, keys=wanted, max_problems=max_problems,
                       max_member_bytes=max_member_bytes, worst=worst)
    result, summary, scans, picked = ValidationResult(), Summary(), [], []
    worst_raw: dict[str, list] = {}
    for si, scan in enumerate(_scan_all(shards, opts, workers, progress)):
        result.shards.append(scan.check)
        for p in scan.problems:
            result.add(p, max_problems)
        summary.merge(scan.summary)
        picked += [(prio, si, i, raw) for prio, i, raw in scan.picked]
        for name, items in scan.worst.items():
            worst_raw[name] = heapq.nlargest(worst, worst_raw.get(name, []) + items, key=lambda t: t[:2])
        scan.picked, scan.worst = [], {}
        scans.append(scan)
    for key, where in _duplicate_keys(scans).items():
        names = ", ".join(_name(w) for w in where)
        result.add(Problem(where[0], f"duplicate key: {len(where)} samples in {names}", key), max_problems)
    if max_shards is None:
        _folder_checks(inputs, shards, lambda path, msg, sev=ERROR: result.add(Problem(path, msg, None, sev),
                                                                               max_problems))
    if wanted is None:
        picked = sorted(picked, key=lambda t: t[0])[:n]
    picked.sort(key=lambda t: (t[1], t[2]))
    samples = []
    for *_, raw in picked:
        try:
            samples.append(decode_sample(raw))
        except Exception:  # noqa: BLE001 - reported by validation already
            continue
    missing = sorted(wanted - {s.key for s in samples}) if wanted is not None else []
    worst_samples: dict[str, list[tuple[float, TripletSample]]] = {}
    for name, items in worst_raw.items():
        for _, _, raw in sorted(items, key=lambda t: t[:2], reverse=True):
            try:
                s = decode_sample(raw)
            except Exception:  # noqa: BLE001 - reported by validation already
                continue
            worst_samples.setdefault(name, []).append((score_value(s.meta, name), s))
    log.info("inspected %d shards, %d samples, %d problems", len(shards), result.nsamples, result.problem_count)
    return InspectResult(result, summary, samples, missing, worst_samples)


def validate(paths: str | Path | Sequence[str | Path], *, max_shards: int | None = None, decode: bool = True,
             workers: int = 1, max_problems: int = 1000, max_member_bytes: int = MAX_MEMBER_BYTES) -> ValidationResult:
    """Check shards (readable to the end, complete and well-typed samples, unique keys, matching markers).

    ``validate(urls, max_shards=4).ok`` is the trainer's pre-flight check; see :func:`inspect_shards`.
    """
    return inspect_shards(paths, n=0, decode=decode, max_shards=max_shards, workers=workers,
                          max_problems=max_problems, max_member_bytes=max_member_bytes).validation


def summarise(paths: str | Path | Sequence[str | Path], *, max_shards: int | None = None,
              workers: int = 1) -> Summary:
    """Streaming statistics of shards (see :class:`~triplets.inspect.summary.Summary`)."""
    return inspect_shards(paths, n=0, max_shards=max_shards, workers=workers).summary


def select_samples(paths: str | Path | Sequence[str | Path], *, n: int = 16, seed: int = 0,
                   keys: Iterable[str] | None = None) -> list[TripletSample]:
    """``n`` samples chosen by seeded key hash (or the given ``keys``), decoded, in dataset order."""
    return inspect_shards(paths, n=n, seed=seed, keys=keys).samples

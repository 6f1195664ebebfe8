"""Derived builds: ``cnc filter`` and ``cnc score`` write a new build folder from an existing one, shard by shard,
exactly once — the same plan → lock → recover → commit protocol as ``cnc build``
(:class:`triplets.shardio.BuildOutput`), on local disk or object storage.

Output shard ``N`` is made from source shard ``N`` (the source's shard ids when its tars are named ``NNNNNN.tar``,
else their position): its samples are streamed through a *transform* (drop some, or replace the ``json`` member)
into a staged tar and committed (tar → errors → marker). ``plan.json`` records the source shards (with their
sha256 from the source markers) and the operation; its fingerprint is the hash of the operation, so a rerun resumes
(committed shards are skipped) and a rerun with another operation or a changed source is refused (exit 2).

Every kept member is copied byte for byte; ``cnc score`` rewrites only the ``json`` member of each sample.

A derived folder is a build folder like any other: shards at the top, ``.huggingface.yaml`` and the dataset card
(``_cnc/README.md``) beside the manifest, and ``_cnc/config.yaml`` (the source build's config for ``cnc filter``, the
scoring config for ``cnc score``), so every command and reader that takes a build takes it.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import yaml

from cnc.base import jsonio
from cnc.base.errors import UserError
from cnc.base.hashing import json_sha256
from cnc.base.location import check_writable_output, resolve
from cnc.config import config_dict, config_hash
from pipelines.plan import prepare_plan
from pipelines.sink import ShardSink
from triplets.shardio import (
    BuildOutput,
    FailureTotals,
    ManifestHeader,
    ShardMarker,
    ShardStats,
    TarStream,
    load_marker,
    read_manifest,
    resolve_shards,
    tar_keys,
    write_manifest,
)
from triplets.shardio.names import CONFIG_FILE, MANIFEST_FILE, marker_for_tar, shard_name, shard_of

log = logging.getLogger(__name__)
DERIVE_PLAN_VERSION = 1

#: ``transform(raw samples of one source shard, counts) -> raw samples to write``; it may count dropped samples
#: in ``counts`` (reason -> n) and report per-sample failures by appending ``{key, stage, reason}`` rows.
Transform = Callable[[Iterator[dict], collections.Counter, list], Iterator[dict]]


@dataclass
class DeriveResult:
    """Totals of a derived build folder (committed shards of every run so far)."""

    output: str
    shards_total: int
    shards_built: int
    shards_skipped: int
    items: int
    samples: int
    dropped: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    seconds: float = 0.0


def _source_shards(source: str) -> list[tuple[int, str]]:
    urls = resolve_shards(source, committed_only=True)
    ids = [shard_of(u.rsplit("/", 1)[-1]) for u in urls]
    if None in ids or len(set(ids)) != len(ids):
        ids = list(range(len(urls)))
    return sorted(zip(ids, urls))  # type: ignore[arg-type]


def _marker(url: str) -> ShardMarker:
    """The source tar's marker (an empty one when it has none or it is unreadable)."""
    try:
        return load_marker(resolve(marker_for_tar(url))) or ShardMarker()
    except (OSError, ValueError):
        return ShardMarker()


def make_derive_plan(source: str, operation: dict) -> dict:
    """The plan of a derived build: source shards (ids, URLs, sample counts, sha256) and the operation."""
    shards = []
    for sid, url in _source_shards(source):
        marker = _marker(url)
        n = marker.nsamples if marker.nsamples is not None else len(tar_keys(url))
        shards.append({"shard": sid, "name": shard_name(sid), "source": url, "nitems": n,
                       "source_sha256": marker.sha256})
    fp = config_hash(operation)
    return {
        "version": DERIVE_PLAN_VERSION, "kind": "derived", "fingerprint": fp, "config": operation,
        "input": resolve(source).url if not source.startswith("pipe:") else source, "input_format": "shards",
        "samples_per_shard": max((s["nitems"] for s in shards), default=0),
        "num_items": sum(s["nitems"] for s in shards),
        "items_sha256": json_sha256(shards),
        "shards": shards,
    }


def source_build(source: str) -> BuildOutput | None:
    """The build folder ``source`` names (``None`` for a glob, a brace pattern or tars)."""
    if source.startswith("pipe:") or any(c in source for c in "*?[{"):
        return None
    loc = resolve(source)
    return BuildOutput(loc) if loc.isdir() else None


def source_sidecar(source: str, name: str) -> bytes | None:
    """A sidecar file (``config.yaml``, ``manifest.json``) of the build folder ``source`` (either layout), or
    ``None``."""
    build = source_build(source)
    if build is None:
        return None
    loc = build.file(name)
    try:
        return loc.read_bytes() if loc.isfile() else None
    except OSError:
        return None


def derive_build(source: str, output: str, operation: dict, transform: Transform, *,
                 scratch_dir: str | None = None, verify: bool = False, lease_seconds: float = 120.0,
                 stage: str = "copy", config_yaml: bytes | None = None) -> DeriveResult:
    """Write ``output`` from ``source`` shard by shard through ``transform`` (see the module docstring).

    Args:
        source: build folder, glob, brace pattern or tars (committed shards only in a build folder).
        output: new folder (local path or fsspec URL); a rerun resumes it.
        operation: JSON-able description of what is done (``{"op": "filter", "where": [...]}``); its hash is the
            plan fingerprint.
        transform: see :data:`Transform`.
        stage: the name under which the transform's seconds go into each marker's ``stage_seconds``.
        config_yaml: the build config written as the output's ``_cnc/config.yaml`` (default: the source's, when
            ``source`` is a build folder that has one).

    Raises:
        cnc.base.errors.UserError: the source names nothing, the output is the source, holds another build or is
            busy.
    """
    t0 = time.perf_counter()
    out = BuildOutput(output, scratch_dir)
    check_writable_output(out.loc)
    plan = make_derive_plan(source, operation)
    if any(resolve(s["source"]).url.rsplit("/", 1)[0] == out.url.rstrip("/") for s in plan["shards"]):
        raise UserError(f"--output {out.url} is the source folder; write the derived build to a new folder")
    sizes = {s["shard"]: s["nitems"] for s in plan["shards"]}
    built = 0
    with out.lock(lease_seconds):
        plan = prepare_plan(out, plan)
        committed = out.recover(plan["fingerprint"], sizes, verify)
        for spec in plan["shards"]:
            if spec["shard"] in committed:
                continue
            _derive_shard(out, spec, plan["fingerprint"], transform, stage)
            built += 1
        markers = {s: m for s, m in out.markers().items() if s in sizes}
        config_yaml = config_yaml if config_yaml is not None else source_sidecar(source, CONFIG_FILE)
        if config_yaml is not None:
            out.file(CONFIG_FILE).write_bytes(config_yaml)
        manifest = _write_manifest(out, plan, markers, source)
        from triplets.card import write_card

        write_card(out, manifest)
    dropped = _dropped(markers.values())
    result = DeriveResult(output=out.url, shards_total=len(sizes), shards_built=built,
                          shards_skipped=len(sizes) - built, items=plan["num_items"],
                          samples=sum(m.nsamples for m in markers.values()), dropped=dict(dropped),
                          failures=FailureTotals.of(markers.values()).failed, seconds=time.perf_counter() - t0)
    log.info("%s: %d of %d samples kept in %d shards (%d built, %d already committed), %.1f s", out.url,
             result.samples, result.items, len(markers), built, result.shards_skipped, result.seconds)
    return result


def _dropped(markers) -> collections.Counter:
    dropped: collections.Counter = collections.Counter()
    for m in markers:
        dropped.update(m.dropped_by_reason or {})
    return dropped


def _derive_shard(out: BuildOutput, spec: dict, fingerprint: str, transform: Transform, stage: str) -> ShardMarker:
    shard, t0 = spec["shard"], time.perf_counter()
    counts: collections.Counter = collections.Counter()
    failures: list[dict] = []
    stream = TarStream(spec["source"], on_problem=lambda msg: log.warning("%s: %s", spec["source"], msg))
    seen = 0

    def source_samples() -> Iterator[dict]:
        nonlocal seen
        for raw in stream.samples():
            seen += 1
            yield {k: v for k, v in raw.items() if not k.startswith("_") or k == "__key__"}

    with ShardSink(out, shard) as sink:
        t = time.perf_counter()
        for raw in transform(source_samples(), counts, failures):
            sink.write(raw)
        seconds = time.perf_counter() - t
        if seen != spec["nitems"]:
            raise UserError(f"source shard {spec['source']} now holds {seen} samples, its plan {spec['nitems']}: the "
                            f"source changed; use a new --output folder")
        if spec.get("source_sha256") and stream.sha256 != spec["source_sha256"]:
            raise UserError(f"source shard {spec['source']} differs from its marker's sha256 (changed or damaged)")
        stats = ShardStats(shard=shard, name=spec["name"], fingerprint=fingerprint, nitems=spec["nitems"],
                           nsamples=sink.written, nfailed=len(failures), ndropped=sum(counts.values()),
                           dropped_by_reason=dict(sorted(counts.items())), source=spec["source"],
                           source_sha256=stream.sha256, seconds=round(time.perf_counter() - t0, 4),
                           stage_seconds={stage: round(seconds, 4)})
        if sink.written + len(failures) + stats.ndropped != spec["nitems"]:
            raise RuntimeError(f"shard {shard}: {sink.written} written + {len(failures)} failed + "
                               f"{stats.ndropped} dropped != {spec['nitems']} source samples")
        marker = sink.commit(sorted(failures, key=lambda r: r["key"]), stats)
    log.info("shard %s committed: %d of %d samples kept (%s)", spec["name"], marker.nsamples, spec["nitems"],
             ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none dropped")
    return marker


def _write_manifest(out: BuildOutput, plan: dict, markers: dict[int, ShardMarker], source: str) -> dict:
    """``manifest.json`` of a derived folder (a wids index too); the source build's models, config and versions are
    carried over (its samples were made by them)."""
    shards = [markers[s] for s in sorted(markers)]
    build = source_build(source)
    try:
        parent = read_manifest(build.file(MANIFEST_FILE))[1] if build is not None else {}
    except (OSError, ValueError):
        parent = {}
    return write_manifest(out.file(MANIFEST_FILE), ManifestHeader.of_markers(out.name, shards), {
        "derived_from": plan["input"], "operation": plan["config"], "fingerprint": plan["fingerprint"],
        "input": parent.get("input"), "input_format": parent.get("input_format"),
        "models": parent.get("models") or {}, "config": parent.get("config") or {},
        "versions": parent.get("versions") or {},
        "totals": {"items": plan["num_items"], "shards_planned": len(plan["shards"]),
                   "shards_committed": len(shards), "samples": sum(m.nsamples for m in shards),
                   "dropped_by_reason": dict(sorted(_dropped(shards).items())),
                   "failures": FailureTotals.of(shards).failed, "bytes": sum(m.bytes for m in shards)},
    })


# ------------------------------------------------------------------------------------------------ the two commands
def filter_transform(quality_filter) -> Transform:
    """Keep the samples whose ``json`` passes ``quality_filter`` (:class:`triplets.quality.QualityFilter`); the kept
    ones byte for byte. An unreadable ``json`` is a failure row (stage ``filter``)."""

    def transform(raws: Iterator[dict], counts: collections.Counter, failures: list) -> Iterator[dict]:
        for raw in raws:
            try:
                meta = jsonio.loads(raw["json"], what="sample json")
            except (KeyError, ValueError) as exc:
                failures.append({"key": raw["__key__"], "stage": "filter", "reason": f"unreadable json: {exc}"})
                continue
            why = quality_filter.reason(meta)
            if why is None:
                yield raw
            else:
                counts[why] += 1

    return transform


def run_filter(source: str, output: str, where: list[str], *, keep_unscored: bool = False,
               allow_version_mix: bool = False, recommended: bool = False, scratch_dir: str | None = None,
               verify: bool = False) -> DeriveResult:
    """``cnc filter``: a copy of ``source`` with the samples satisfying every ``where`` condition (plus the shipped
    thresholds with ``recommended``).

    Samples scored by another quality version are refused (:class:`~triplets.quality_filter.QualityVersionError`,
    before anything is written when the first sample of a shard shows it) unless ``allow_version_mix``, which
    treats them as unscored (``keep_unscored`` decides).
    """
    from triplets.quality_filter import QualityFilter, parse_where, recommended_conditions

    conditions = [parse_where(w) for w in where] + (recommended_conditions() if recommended else [])
    if not conditions:
        raise UserError("cnc filter: give at least one --where condition, e.g. --where 'removal>=0.5', or "
                        "--recommended")
    qf = QualityFilter(conditions, keep_unscored=keep_unscored, refuse_other_versions=not allow_version_mix)
    if not allow_version_mix:
        _check_versions(source, qf)
    operation = {"op": "filter", "where": [str(c) for c in conditions], "keep_unscored": keep_unscored}
    if allow_version_mix:
        operation["allow_version_mix"] = True
    return derive_build(source, output, operation, filter_transform(qf), scratch_dir=scratch_dir, verify=verify,
                        stage="filter")


def _check_versions(source: str, qf) -> None:
    """Judge the first sample of every source shard with ``qf`` (which raises on another quality version), so a
    build of old scores is refused before any output is written."""
    for _, url in _source_shards(source):
        for raw in TarStream(url).samples():
            try:
                meta = jsonio.loads(raw["json"], what="sample json")
            except (KeyError, ValueError):
                pass
            else:
                qf.reason(meta)
            break


def score_transform(scorer, batch_size: int = 4) -> Transform:
    """Recompute ``quality`` from the stored fields with ``scorer`` (:class:`triplets.quality.QualityScorer`: D(I)
    from its depth model, D(I_b) as stored) and replace only the ``json`` member; an undecodable sample is a failure
    row (stage ``quality``)."""
    import numpy as np  # kept out of `cnc --help` (pipelines.cli imports this module)

    from triplets.sample import decode_sample

    def flush(pending: list[tuple[dict, object]], failures: list) -> Iterator[dict]:
        if not pending:
            return
        samples = [s for _, s in pending]
        try:
            scores = scorer(np.stack([s.image for s in samples]), np.stack([s.mask for s in samples]),
                            np.stack([s.background for s in samples]), np.stack([s.bg_depth for s in samples]))
        except Exception:  # noqa: BLE001 - isolate the culprit: score row by row
            if len(pending) == 1:
                raw, s = pending[0]
                failures.append({"key": raw["__key__"], "stage": "quality", "reason": "scoring failed"})
                log.warning("scoring %s failed", raw["__key__"], exc_info=True)
                return
            for one in pending:
                yield from flush([one], failures)
            return
        for (raw, s), q in zip(pending, scores):
            meta = dict(s.meta, quality=q)
            yield dict(raw, json=json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))

    def transform(raws: Iterator[dict], counts: collections.Counter, failures: list) -> Iterator[dict]:
        pending: list = []
        for raw in raws:
            try:
                s = decode_sample(raw)
            except Exception as exc:  # noqa: BLE001 - a sample that does not decode cannot be scored
                failures.append({"key": raw["__key__"], "stage": "quality", "reason": f"does not decode: {exc}"[:300]})
                continue
            same = not pending or pending[0][1].image.shape == s.image.shape
            if not same or len(pending) >= batch_size:
                yield from flush(pending, failures)
                pending = []
            pending.append((raw, s))
        yield from flush(pending, failures)

    return transform


def run_score(source: str, output: str, cfg, *, scratch_dir: str | None = None, verify: bool = False,
              device: str | None = None) -> DeriveResult:
    """``cnc score``: a copy of ``source`` whose samples carry freshly computed ``quality`` scores of the current
    version (:data:`triplets.quality.QUALITY_VERSION`), whatever version they carried before.

    ``cfg`` is the source's :class:`~triplets.config.BuildConfig` (its depth model, CLIP, dilation and quality
    settings are used); only the depth model (D(I), which shards do not store) and CLIP are loaded.
    """
    from triplets.quality import QUALITY_VERSION, scorer_from_config, scorer_models

    operation = {"op": "score", "quality_version": QUALITY_VERSION, "models": scorer_models(cfg),
                 "depth_preprocess": cfg.depth.preprocess, "dilation_px": cfg.inpaint.dilation_px,
                 "change_floor": cfg.quality.change_floor, "clip_sim": cfg.quality.clip_sim,
                 "batch_size": cfg.batch_size}
    plan_check = make_derive_plan(source, operation)  # fail on a bad source before loading models
    if not plan_check["shards"]:
        raise UserError(f"no shards in {source}")
    scorer = scorer_from_config(cfg, device)
    config_yaml = yaml.safe_dump(config_dict(cfg), sort_keys=False).encode()
    return derive_build(source, output, operation, score_transform(scorer, cfg.batch_size), scratch_dir=scratch_dir,
                        verify=verify, stage="quality", config_yaml=config_yaml)

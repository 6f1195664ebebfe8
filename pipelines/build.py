"""``cnc build``: plan, build on Ray, commit exactly once, resume, report.

Entry points (the CLI, job launchers, tests and benchmarks call these)::

    run_build(cfg, input, output, address=None, retry_failed=False) -> BuildResult
    build_entry(config, input, output, overrides, ...) -> int   # exit code, what `cnc build` runs

Steps of :func:`run_build`:

1. fail fast: resolve every model (:func:`triplets.builder.resolve_models`) and the output location;
2. plan: read the input, split it into shard specs, write or check ``plan.json``;
3. recover: lock the output, delete uncommitted files, list committed shards;
4. build the remaining shards with a :class:`~pipelines.scheduler.ShardScheduler`;
5. write ``manifest.json`` from the markers and return the totals.

The output may be a local folder or an object-store URL (``s3://``, ``gs://``, any fsspec filesystem): the commit
protocol (:class:`triplets.shardio.BuildOutput`) gives the same guarantees on both.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import platform
import re
import signal
import time
from importlib import metadata

from cnc.base.location import check_writable_output
from cnc.config import config_dict, load_config, save_config
from cnc.ray_session import Interrupted, connect_address, interrupt_on_sigterm, ray_session
from pipelines.plan import (
    absolute_input,
    plan_input,
    plan_summary,
    prepare_plan,
    refuse_foreign_folder,
    shard_size,
)
from pipelines.result import BuildResult
from pipelines.scheduler import ShardScheduler
from triplets.card import write_card
from triplets.config import BuildConfig
from triplets.shardio import BuildOutput, FailureTotals, ManifestHeader, ShardMarker
from triplets.shardio import write_manifest as write_manifest_file
from triplets.shardio.names import CONFIG_FILE, MANIFEST_FILE, PLAN_FILE, shard_name

log = logging.getLogger(__name__)
#: Test-only fault injection (JSON, see :class:`pipelines.worker.FaultInjection`).
FAULT_ENV = "CNC_TEST_FAULT_INJECTION"


# -- manifest ----------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the shards."""
    out = {"python": platform.python_version()}
    for pkg in ("cnc", "torch", "diffusers", "transformers", "ray", "webdataset", "segment-anything", "numpy",
                "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None  # type: ignore[assignment]
    return out


def write_manifest(output: BuildOutput, cfg: BuildConfig, plan: dict, markers: dict[int, ShardMarker]) -> dict:
    """Rewrite ``manifest.json`` (atomically) from the committed markers, and the dataset card.

    The manifest is also a wids shard index (:class:`~triplets.shardio.ManifestHeader`); its shard URLs are relative
    to the build folder (``wids.ShardListDataset(f"{folder}/_cnc/manifest.json", base=folder)``)."""
    shards = [markers[s] for s in sorted(markers)]
    models: dict = {}
    seen: dict[str, list] = collections.defaultdict(list)  # every distinct identity per key
    for m in shards:
        for k, v in (m.models or {}).items():
            models.setdefault(k, v)
            if v not in seen[k]:
                seen[k].append(v)
    mixed = {k: v for k, v in seen.items() if len(v) > 1}
    for k, v in mixed.items():
        log.warning("shards were built with different %s: %s", k, " vs ".join(str(x.get("identity")) for x in v))
    failed = FailureTotals.of(shards)
    manifest = write_manifest_file(output.file(MANIFEST_FILE), ManifestHeader.of_markers(output.name, shards), {
        "config": config_dict(cfg),
        "fingerprint": plan["fingerprint"],
        "input": plan["input"],
        "input_format": plan["input_format"],
        "versions": package_versions(),
        "models": models,
        "model_changes": {"shards": mixed, "resumes": plan.get("model_changes", [])},
        "totals": {
            "items": plan["num_items"], "shards_planned": len(plan["shards"]), "shards_committed": len(shards),
            "shards_uncommitted": sorted({s["shard"] for s in plan["shards"]} - set(markers)),
            "samples": sum(m.nsamples for m in shards), "failures": failed.failed,
            "bytes": sum(m.bytes for m in shards), "failures_by_stage": dict(sorted(failed.by_stage.items())),
            "failures_by_reason": dict(failed.by_reason.most_common(100)),
            "gpu_or_model_seconds": round(sum(v for m in shards for k, v in (m.stage_seconds or {}).items()
                                              if k not in ("fetch", "decode", "encode", "write")), 3),
        },
    })

    write_card(output, manifest)  # _cnc/README.md + .huggingface.yaml (datasets.load_dataset(folder))
    return manifest


# -- entry points ------------------------------------------------------------------------------
def run_build(cfg: BuildConfig, input: str, output: str, *, address: str | None = None,
              retry_failed: bool = False, progress: bool | None = None, verify_checksums: bool | None = None,
              fault_injection: dict | None = None, allow_model_change: bool = False) -> BuildResult:
    """Build (or resume) the triplet shards of ``input`` into ``output``.

    Args:
        cfg: the validated build config (``cfg.input_format`` selects the reader).
        input: folder, COCO captions json, tar or brace pattern, table file/folder/glob (see :mod:`triplets.readers`);
            local or a URL.
        output: the build folder: a local path or an fsspec URL (created; reruns resume it).
        address: ``auto`` or ``HOST:PORT`` = join that cluster; ``None`` = the current Ray connection,
            else ``$RAY_ADDRESS`` when set (``ray job submit``), else a private local Ray on 127.0.0.1.
        retry_failed: also rebuild committed shards whose markers record failed samples (their good
            samples are copied, only the failures are computed again).
        progress: live bar (``None`` = on a terminal only).
        verify_checksums: re-hash committed tars on start (default ``cfg.storage.verify``; sizes are always checked).
        fault_injection: test-only worker hooks (default: ``$CNC_TEST_FAULT_INJECTION``).
        allow_model_change: resume even though a model's identity (hub commit / weight hash) changed; the plan
            and the manifest record both identities.

    Raises:
        cnc.base.errors.UserError: a model cannot be found, the output holds a build of another input/config or is
            held by another build, the input cannot be read, the cluster at ``address`` does not answer within
            ``ray.connect_timeout_s``, no worker can be placed (before any work).
    """
    t0 = time.perf_counter()
    _check_cluster(address, cfg.ray.connect_timeout_s)
    resolved, out, plan = _plan(cfg, input, output)  # 1. fail fast + 2. plan
    if fault_injection is None and os.environ.get(FAULT_ENV):
        fault_injection = json.loads(os.environ[FAULT_ENV])
    verify = cfg.storage.verify if verify_checksums is None else verify_checksums
    refuse_foreign_folder(out)  # before the lock: a refused folder keeps no .lock
    with out.lock(cfg.storage.lease_seconds):
        plan = prepare_plan(out, plan, allow_model_change)
        save_config(cfg, out.file(CONFIG_FILE))
        sizes = {s["shard"]: shard_size(s) for s in plan["shards"]}
        committed = out.recover(plan["fingerprint"], sizes, verify)  # 3. recover
        todo = [(s, False) for s in sorted(sizes) if s not in committed]
        if retry_failed:
            todo += [(s, True) for s, m in sorted(committed.items()) if (m.nfailed or 0) > 0]
            todo.sort()
        log.info("%d of %d shards committed; building %d%s", len(committed), len(sizes), len(todo),
                 " (incl. shards with failures, --retry-failed)" if retry_failed else "")
        built: dict[int, ShardMarker] = {}
        reasons: dict[int, str] = {}
        interrupted = None
        if todo:  # 4. build
            probe = out.write_probe()
            try:
                # ours before Ray starts, and again after ray.init() installed Ray's own SIGTERM handler
                with interrupt_on_sigterm(), ray_session(address, cfg.ray.connect_timeout_s), interrupt_on_sigterm():
                    scheduler = ShardScheduler(cfg, resolved, plan["fingerprint"], out.url, probe, fault_injection)
                    specs = {s["shard"]: s for s in plan["shards"]}
                    done = scheduler.run(specs, todo, progress)
                built, interrupted, reasons = done.markers, done.interrupted, done.reasons
            except Interrupted as exc:  # arrived while Ray was starting or stopping
                interrupted = exc
            except SystemExit as exc:  # Ray's own SIGTERM handler (active inside ray.init) exits with the signal
                if exc.code != signal.SIGTERM:
                    raise
                interrupted = Interrupted(signal.SIGTERM)
            finally:
                out.remove_probes()
            out.remove_temp_files()  # leftovers of attempts whose worker died (all workers are gone now)
        markers = {s: m for s, m in out.markers().items() if s in sizes}
        write_manifest(out, cfg, plan, markers)  # 5. manifest
    result = _result(out, cfg, plan, markers, built, len(sizes) - len(todo), time.perf_counter() - t0, reasons)
    if interrupted is not None:
        result.interrupted = interrupted.signum
        log.error("build interrupted by %s: %d of %d shards committed; rerun the same command to resume",
                  interrupted, result.shards_committed, result.shards_total)
    elif result.exit_code:
        log.error("%s (errors: %s/)", result.status_line(), out.loc.child(out.layout.errors_dir).url)
    return result


def _check_cluster(address: str | None, timeout_s: float) -> None:
    """Refuse an unreachable ``--address`` (or ``$RAY_ADDRESS``) in one line before any work (exit 2)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return
    import ray


    if not ray.is_initialized():
        connect_address(address, timeout_s)


def _plan(cfg: BuildConfig, input: str, output: str) -> tuple[dict, BuildOutput, dict]:
    """Steps 1 and 2: resolve the models (fail fast, nothing loaded) and the output, then plan the input.

    Returns ``(resolved models, output, plan)``.
    """
    from triplets.builder import model_identities, resolve_models
    from triplets.readers import detect_format

    resolved = resolve_models(cfg)  # before reading anything or starting Ray
    out = BuildOutput(output, cfg.storage.scratch_dir)
    check_writable_output(out.loc)
    src = absolute_input(input)
    fmt = detect_format(src) if cfg.input_format == "auto" else cfg.input_format
    models = model_identities(cfg, resolved)  # hub commits / weight hashes (cached per file)
    return resolved, out, plan_input(cfg, src, fmt, models, version=_plan_version(out))


def _plan_version(out: BuildOutput) -> int | None:
    """The version of the plan already in ``out``, from its last bytes (sorted keys: ``version`` comes last; a
    version-1 plan may be huge)."""
    path = out.file(PLAN_FILE)
    size = path.size()
    if not size:
        return None
    try:
        with path.open("rb") as f:
            f.seek(max(0, size - 256))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    m = re.search(r'"version":\s*(\d+)\s*}\s*$', tail)
    return int(m.group(1)) if m else None


def run_plan_only(cfg: BuildConfig, input: str, output: str, *, allow_model_change: bool = False) -> dict:
    """Plan ``input`` and write (or check) ``OUTPUT/plan.json`` without loading a model or starting Ray.

    Returns:
        :func:`pipelines.plan.plan_summary` of the plan plus ``plan`` (its URL), ``plan_bytes`` and ``seconds``.

    Raises:
        cnc.base.errors.UserError: as :func:`run_build` (missing model, unreadable input, another build there).
    """
    t0 = time.perf_counter()
    _, out, plan = _plan(cfg, input, output)
    refuse_foreign_folder(out)  # before the lock: a refused folder keeps no .lock
    with out.lock(cfg.storage.lease_seconds):
        plan = prepare_plan(out, plan, allow_model_change)
        save_config(cfg, out.file(CONFIG_FILE))
    path = out.file(PLAN_FILE)
    return {**plan_summary(plan), "plan": path.url, "plan_bytes": path.size(),
            "seconds": round(time.perf_counter() - t0, 3)}


def _result(out: BuildOutput, cfg: BuildConfig, plan: dict, markers: dict[int, ShardMarker],
            built: dict[int, ShardMarker], skipped: int, seconds: float,
            reasons: dict[int, str] | None = None) -> BuildResult:
    """The totals of ``out``; ``reasons``: why a shard of this run was left uncommitted (one line each, counted
    per sample in ``failures_by_reason``)."""
    sizes = {s["shard"]: shard_size(s) for s in plan["shards"]}
    uncommitted = sorted(set(sizes) - set(markers))
    failed = FailureTotals.of(markers.values())
    stage_s: collections.Counter = collections.Counter()
    for m in built.values():
        stage_s.update(m.stage_seconds or {})
    missing = sum(sizes[s] for s in uncommitted)
    for s in uncommitted:
        why = (reasons or {}).get(s)
        failed.by_reason[f"shard not committed: {why}" if why else "shard not committed (worker died or not built)"] \
            += sizes[s]
    result = BuildResult(
        output=out.url, items_total=plan["num_items"], shards_total=len(sizes), shards_committed=len(markers),
        shards_built=len(built), shards_skipped=skipped, shards_lost=uncommitted,
        samples=sum(m.nsamples for m in markers.values()), failures=failed.failed + missing,
        max_failure_fraction=cfg.max_failure_fraction, seconds=seconds,
        items_processed=sum(m.nitems - (m.nreused or 0) for m in built.values()),
        bytes=sum(m.bytes for m in markers.values()), failures_by_stage=dict(failed.by_stage),
        failures_by_reason=dict(failed.by_reason), stage_seconds={k: round(v, 3) for k, v in sorted(stage_s.items())},
    )
    log.info("build: %d samples, %d failures (%.2f%%, max_failure_fraction %.2f%%), %d/%d shards committed, %.1f s",
             result.samples, result.failures, 100 * result.failure_fraction, 100 * cfg.max_failure_fraction,
             result.shards_committed, result.shards_total, seconds)
    if uncommitted and reasons:  # why each shard of this run failed (the status line names them)
        log.error("%d shard(s) not committed: %s", len(uncommitted),
                  ", ".join(shard_name(s) + (f" ({reasons[s]})" if s in reasons else "") for s in uncommitted[:10]))
    return result


def build_entry(config: str | None, input: str, output: str, overrides: list[str] | None = None, *,
                address: str | None = None, retry_failed: bool = False, input_format: str | None = None,
                progress: bool | None = None, verify: bool = False, summary: bool = True,
                allow_model_change: bool = False, plan_only: bool = False, workers: int | None = None) -> int:
    """What ``cnc build`` runs: load the config, :func:`run_build`, print the summary; return the exit code.

    Exit codes: 0 ok; 1 failures above ``max_failure_fraction`` or shards left uncommitted; 2 a user error
    (:class:`~cnc.base.errors.UserError`: bad config/input/location, unavailable model(s), an output of another
    build; raised to the CLI, which prints one line per problem); 130/143 after SIGINT/SIGTERM.
    """
    overrides = list(overrides or [])
    options = {}
    if input_format:
        overrides.append(f"input_format={input_format}")
        options["input_format"] = "--input-format"
    if workers is not None:
        overrides.append(f"ray.num_workers={workers}")
        options["ray.num_workers"] = "--workers"
    cfg = load_config(BuildConfig, config, overrides, options=options)
    if plan_only:
        info = run_plan_only(cfg, input, output, allow_model_change=allow_model_change)
        if summary:
            print(json.dumps(info, indent=1))  # noqa: T201 - the command's output (stdout, machine-readable)
        return 0
    result = run_build(cfg, input, output, address=address, retry_failed=retry_failed, progress=progress,
                       verify_checksums=verify or None, allow_model_change=allow_model_change)
    if summary:
        from pipelines.progress import print_summary

        print_summary(result)
    return result.exit_code


__all__ = ["BuildResult", "build_entry", "run_build", "run_plan_only", "write_manifest"]

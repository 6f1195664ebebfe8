"""``cnc build``: plan, build on Ray, commit exactly once, resume, report.

Entry points (the CLI, job launchers, tests and benchmarks call these)::

    run_build(cfg, input, output, address=None, retry_failed=False) -> BuildResult
    build_entry(config, input, output, overrides, ...) -> int   # exit code, what `cnc build` runs

Steps of :func:`run_build`:

1. fail fast: resolve every model (:func:`triplets.builder.resolve_models`) before anything else;
2. plan: read the input, split it into shard specs, write or check ``plan.json``;
3. recover: lock the folder, delete uncommitted files, list committed shards;
4. build the remaining shards on a pool of :class:`~pipelines.worker.ShardWorker` actors,
   retrying shards whose worker died;
5. write ``manifest.json`` from the markers and return the totals.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import platform
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cnc.config import config_dict, save_config
from pipelines.layout import (
    CONFIG_FILE,
    MANIFEST_FILE,
    OutputLock,
    committed_markers,
    recover,
    remove_temp_files,
    write_json,
)
from pipelines.plan import absolute_input, make_plan, prepare_plan
from pipelines.progress import BuildProgress
from triplets.config import BuildConfig

log = logging.getLogger(__name__)
#: Test-only fault injection (JSON, see :class:`pipelines.worker.FaultInjection`).
FAULT_ENV = "CNC_TEST_FAULT_INJECTION"


@dataclass
class BuildResult:
    """Totals of a build folder after a run (committed shards of every run so far + this run)."""

    output: Path
    items_total: int
    shards_total: int
    shards_committed: int
    shards_built: int
    shards_skipped: int
    shards_lost: list[int]
    samples: int
    failures: int
    max_failure_fraction: float
    seconds: float
    items_processed: int = 0
    bytes: int = 0
    failures_by_stage: dict[str, int] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failure_fraction(self) -> float:
        return self.failures / self.items_total if self.items_total else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.items_processed / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every shard is committed and failures/items ≤ ``max_failure_fraction``, else 1."""
        return 0 if not self.shards_lost and self.failure_fraction <= self.max_failure_fraction else 1


# -- Ray -------------------------------------------------------------------------------------
def init_local_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Start a private local Ray bound to 127.0.0.1 only (no dashboard).

    ``_node_ip_address="127.0.0.1"`` alone is not enough on Linux: Ray "resolves" a loopback
    node address to the machine's routable IP and its gRPC servers listen on every interface.
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray treat the node as local-only (as it does on
    macOS/Windows): the node IP stays 127.0.0.1 and every server binds to it.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # the env var is read at import; ray may be imported already
    ray.init(address="local", num_cpus=num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False,
             _node_ip_address="127.0.0.1", **kwargs)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the current Ray connection, or join ``address`` (``auto`` | ``HOST:PORT``; default ``$RAY_ADDRESS``,
    which ``ray job submit`` sets), or start a private local Ray."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()  # Ray resolves $RAY_ADDRESS itself
    else:
        init_local_ray()
    try:
        yield
    finally:
        ray.shutdown()


def plan_workers(cfg: BuildConfig, resources: dict, nshards: int) -> tuple[int, float, int]:
    """``(workers, gpus per worker, torch threads)`` for the cluster ``resources``.

    GPUs (unless ``device=cpu``): ``ray.num_workers`` or ``floor(GPUs / gpus_per_worker)``.
    CPU only: ``ray.num_workers`` or one per 2 CPUs (the other CPU of each pair stays free for the
    worker's decode/write threads and the driver), capped by ``CPUs / cpus_per_worker``.
    Never more workers than shards to build.
    """
    rc = cfg.ray
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    use_gpu = gpus > 0 and not cfg.device.startswith("cpu")
    if cfg.device.startswith("cuda") and gpus == 0:
        raise RuntimeError(f"device={cfg.device} but the Ray cluster has no GPU")
    if use_gpu:
        n = rc.num_workers or max(1, math.floor(gpus / rc.gpus_per_worker + 1e-9))
    else:
        n = rc.num_workers or max(1, int(cpus // 2))
        n = min(n, max(1, int(cpus // rc.cpus_per_worker)))
    threads = rc.torch_threads or max(1, int(rc.cpus_per_worker))
    return max(1, min(n, nshards)), (rc.gpus_per_worker if use_gpu else 0.0), threads


def _build_remaining(cfg: BuildConfig, resolved: dict, plan: dict, output: Path, todo: list[tuple[int, bool]],
                     progress: bool | None, fault: dict | None) -> tuple[dict[int, dict], list[int]]:
    """Build shards ``todo`` (``(shard, reuse_committed)``) on an actor pool; return (markers, lost shards)."""
    import ray

    from pipelines.worker import ProgressTracker, ShardWorker

    specs = {s["shard"]: s for s in plan["shards"]}
    nworkers, gpus, threads = plan_workers(cfg, ray.cluster_resources(), len(todo))
    rc = cfg.ray
    log.info("starting %d worker(s): %s GPU, %s CPU, %d torch thread(s) each", nworkers, gpus, rc.cpus_per_worker,
             threads)
    tracker_name = f"cnc-build-progress-{uuid.uuid4().hex[:12]}"
    tracker = ray.remote(num_cpus=0)(ProgressTracker).options(name=tracker_name).remote()
    ray.get(tracker.totals.remote())  # registered before any worker looks it up by name
    actor_cls = ray.remote(ShardWorker).options(num_cpus=rc.cpus_per_worker, num_gpus=gpus, max_restarts=-1,
                                               max_task_retries=0)
    cfg_json = cfg.model_dump(mode="json")
    actors = [actor_cls.remote(cfg_json, resolved, plan["fingerprint"], threads, tracker_name, fault)
              for _ in range(nworkers)]
    pending = collections.deque(todo)
    attempts: dict[int, int] = collections.Counter()
    strikes: dict[int, int] = collections.Counter()  # consecutive failures per actor
    inflight: dict = {}
    idle = list(range(nworkers))
    done: dict[int, dict] = {}
    lost: list[int] = []
    total = sum(len(specs[s]["items"]) for s, _ in todo)
    bar = BuildProgress(total, progress, rc.progress_interval_s)
    try:
        while pending or inflight:
            while idle and pending:
                a = idle.pop(0)
                shard, reuse = pending.popleft()
                ref = actors[a].build_shard.remote(specs[shard], str(output), attempts[shard], reuse)
                inflight[ref] = (a, shard, reuse)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=min(rc.progress_interval_s, 10.0))
            for ref in ready:
                a, shard, reuse = inflight.pop(ref)
                try:
                    done[shard] = ray.get(ref)
                    strikes[a] = 0
                except ray.exceptions.RayError as exc:
                    attempts[shard] += 1
                    strikes[a] += 1
                    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    if attempts[shard] <= rc.max_shard_retries:
                        log.warning("shard %06d failed on attempt %d (%s: %s); retrying", shard, attempts[shard],
                                    type(exc).__name__, reason)
                        pending.appendleft((shard, reuse))
                    else:
                        log.error("shard %06d failed %d times (%s: %s); left uncommitted, a rerun retries it",
                                  shard, attempts[shard], type(exc).__name__, reason)
                        lost.append(shard)
                if strikes[a] <= rc.max_shard_retries:
                    idle.append(a)
                else:
                    log.error("worker %d failed %d shards in a row; removed from the pool", a, strikes[a])
            if not idle and not inflight and pending:
                log.error("no worker left; %d shard(s) not built", len(pending))
                lost += [s for s, _ in pending]
                pending.clear()
            n_done, n_failed = ray.get(tracker.totals.remote())
            bar.update(n_done, n_failed, len(done), len(todo))
    finally:
        bar.close()
        for actor in actors + [tracker]:
            ray.kill(actor, no_restart=True)
    return done, sorted(lost)


# -- manifest ----------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the shards."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("cnc", "torch", "diffusers", "transformers", "ray", "webdataset", "segment-anything", "numpy",
                "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None  # type: ignore[assignment]
    return out


def write_manifest(output: Path, cfg: BuildConfig, plan: dict, markers: dict[int, dict]) -> dict:
    """Rewrite ``manifest.json`` (atomically) from the committed markers; also a wids shard index."""
    shards = [markers[s] for s in sorted(markers)]
    models: dict = {}
    seen: dict[str, list] = collections.defaultdict(list)  # every distinct identity per key
    for m in shards:
        for k, v in (m.get("models") or {}).items():
            models.setdefault(k, v)
            if v not in seen[k]:
                seen[k].append(v)
    mixed = {k: v for k, v in seen.items() if len(v) > 1}
    for k, v in mixed.items():
        log.warning("shards were built with different %s: %s", k, " vs ".join(str(x.get("identity")) for x in v))
    by_stage: collections.Counter = collections.Counter()
    by_reason: collections.Counter = collections.Counter()
    for m in shards:
        by_stage.update(m.get("failures_by_stage", {}))
        by_reason.update(m.get("failures_by_reason", {}))
    manifest = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": output.name,
        "shardlist": [{"url": m["url"], "nsamples": m["nsamples"], "filesize": m["bytes"], "sha256": m["sha256"]}
                      for m in shards],
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
            "samples": sum(m["nsamples"] for m in shards), "failures": sum(m["nfailed"] for m in shards),
            "bytes": sum(m["bytes"] for m in shards), "failures_by_stage": dict(sorted(by_stage.items())),
            "failures_by_reason": dict(by_reason.most_common(100)),
            "gpu_or_model_seconds": round(sum(v for m in shards for k, v in m.get("stage_seconds", {}).items()
                                              if k not in ("decode", "encode", "write")), 3),
        },
    }
    write_json(output / MANIFEST_FILE, manifest)
    return manifest


# -- entry points ------------------------------------------------------------------------------
def run_build(cfg: BuildConfig, input: str, output: str | Path, *, address: str | None = None,
              retry_failed: bool = False, progress: bool | None = None, verify_checksums: bool = True,
              fault_injection: dict | None = None, allow_model_change: bool = False) -> BuildResult:
    """Build (or resume) the triplet shards of ``input`` into ``output``.

    Args:
        cfg: the validated build config (``cfg.input_format`` selects the reader).
        input: folder, COCO captions json, tar or brace pattern (see :mod:`triplets.readers`).
        output: the build folder (created; reruns resume it).
        address: ``auto`` or ``HOST:PORT`` = join that cluster; ``None`` = the current Ray connection,
            else ``$RAY_ADDRESS`` when set (``ray job submit``), else a private local Ray on 127.0.0.1.
        retry_failed: also rebuild committed shards whose markers record failed samples (their good
            samples are copied, only the failures are computed again).
        progress: live bar (``None`` = on a terminal only).
        verify_checksums: re-hash committed tars on start (sizes are always checked).
        fault_injection: test-only worker hooks (default: ``$CNC_TEST_FAULT_INJECTION``).
        allow_model_change: resume even though a model's identity (hub commit / weight hash) changed; the plan
            and the manifest record both identities.

    Raises:
        triplets.errors.ModelUnavailableError: a model cannot be found (before any work).
        pipelines.plan.PlanMismatchError: ``output`` holds a build of another input/config.
        triplets.readers.InputError: the input cannot be read.
        pipelines.layout.OutputBusyError: another build holds the folder's lock.
    """
    from triplets.builder import model_identities, resolve_models
    from triplets.readers import detect_format, read_items

    t0 = time.perf_counter()
    resolved = resolve_models(cfg)  # 1. fail fast, before reading anything or starting Ray
    src = absolute_input(input)
    fmt = detect_format(src) if cfg.input_format == "auto" else cfg.input_format
    models = model_identities(cfg, resolved)  # hub commits / weight hashes (cached per file)
    plan = make_plan(read_items(src, fmt), cfg, src, fmt, models)  # 2. plan
    out = Path(output).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    if fault_injection is None and os.environ.get(FAULT_ENV):
        fault_injection = json.loads(os.environ[FAULT_ENV])
    with OutputLock(out):
        plan = prepare_plan(out, plan, allow_model_change)
        save_config(cfg, out / CONFIG_FILE)
        sizes = {s["shard"]: len(s["items"]) for s in plan["shards"]}
        committed = recover(out, plan["fingerprint"], sizes, verify_checksums)  # 3. recover
        todo = [(s, False) for s in sorted(sizes) if s not in committed]
        if retry_failed:
            todo += [(s, True) for s, m in sorted(committed.items()) if m.get("nfailed", 0) > 0]
            todo.sort()
        log.info("%d of %d shards committed; building %d%s", len(committed), len(sizes), len(todo),
                 " (incl. shards with failures, --retry-failed)" if retry_failed else "")
        built: dict[int, dict] = {}
        lost: list[int] = []
        if todo:  # 4. build
            with ray_session(address):
                built, lost = _build_remaining(cfg, resolved, plan, out, todo, progress, fault_injection)
            remove_temp_files(out)  # leftovers of attempts whose worker died (all workers are gone now)
        markers = {s: m for s, m in committed_markers(out).items() if s in sizes}
        write_manifest(out, cfg, plan, markers)  # 5. manifest
    return _result(out, cfg, plan, markers, built, lost, len(sizes) - len(todo), time.perf_counter() - t0)


def _result(out: Path, cfg: BuildConfig, plan: dict, markers: dict[int, dict], built: dict[int, dict],
            lost: list[int], skipped: int, seconds: float) -> BuildResult:
    sizes = {s["shard"]: len(s["items"]) for s in plan["shards"]}
    uncommitted = sorted(set(sizes) - set(markers))
    by_stage: collections.Counter = collections.Counter()
    by_reason: collections.Counter = collections.Counter()
    stage_s: collections.Counter = collections.Counter()
    for m in markers.values():
        by_stage.update(m.get("failures_by_stage", {}))
        by_reason.update(m.get("failures_by_reason", {}))
    for m in built.values():
        stage_s.update(m.get("stage_seconds", {}))
    missing = sum(sizes[s] for s in uncommitted)
    if missing:
        by_reason["shard not committed (worker died or not built)"] += missing
    result = BuildResult(
        output=out, items_total=plan["num_items"], shards_total=len(sizes), shards_committed=len(markers),
        shards_built=len(built), shards_skipped=skipped, shards_lost=uncommitted,
        samples=sum(m["nsamples"] for m in markers.values()),
        failures=sum(m["nfailed"] for m in markers.values()) + missing,
        max_failure_fraction=cfg.max_failure_fraction, seconds=seconds,
        items_processed=sum(m["nitems"] - m.get("nreused", 0) for m in built.values()),
        bytes=sum(m["bytes"] for m in markers.values()), failures_by_stage=dict(by_stage),
        failures_by_reason=dict(by_reason), stage_seconds={k: round(v, 3) for k, v in sorted(stage_s.items())},
    )
    log.info("build %s: %d samples, %d failures (%.2f%%, limit %.2f%%), %d/%d shards committed, %.1f s",
             "OK" if result.exit_code == 0 else "FAILED", result.samples, result.failures,
             100 * result.failure_fraction, 100 * cfg.max_failure_fraction, result.shards_committed,
             result.shards_total, seconds)
    if result.failure_fraction > cfg.max_failure_fraction:
        log.error("failures %d/%d = %.2f%% exceed max_failure_fraction %.2f%% (see %s/errors/)", result.failures,
                  result.items_total, 100 * result.failure_fraction, 100 * cfg.max_failure_fraction, out)
    if uncommitted:
        log.error("%d shard(s) not committed: %s; rerun the same command to retry them", len(uncommitted),
                  ", ".join(f"{s:06d}" for s in uncommitted[:10]))
    return result


def build_entry(config: str | None, input: str, output: str, overrides: list[str] | None = None, *,
                address: str | None = None, retry_failed: bool = False, input_format: str | None = None,
                progress: bool | None = None, summary: bool = True, allow_model_change: bool = False) -> int:
    """What ``cnc build`` runs: load the config, :func:`run_build`, print the summary; return the exit code.

    Exit codes: 0 ok; 1 failures above ``max_failure_fraction`` or shards left uncommitted;
    2 bad config/input, unavailable model(s), or an output folder of another build (one log line per
    problem, no traceback).
    """
    from cnc.config import ConfigError, load_config
    from pipelines.layout import OutputBusyError
    from pipelines.plan import PlanMismatchError
    from triplets.errors import ModelUnavailableError
    from triplets.readers import InputError

    overrides = list(overrides or [])
    if input_format:
        overrides.append(f"input_format={input_format}")
    try:
        cfg = load_config(BuildConfig, config, overrides)
        result = run_build(cfg, input, output, address=address, retry_failed=retry_failed, progress=progress,
                           allow_model_change=allow_model_change)
    except (ConfigError, ModelUnavailableError, PlanMismatchError, InputError, OutputBusyError) as exc:
        for line in str(exc).splitlines():  # one log line per problem (e.g. per missing model), no traceback
            log.error("%s", line)
        return 2
    if summary:
        from pipelines.progress import print_summary

        print_summary(result)
    return result.exit_code


__all__ = ["BuildResult", "build_entry", "init_local_ray", "plan_workers", "run_build", "write_manifest"]

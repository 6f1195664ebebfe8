"""The shard scheduler: a pool of :class:`~pipelines.worker.ShardWorker` actors, shard assignment and retries.

:class:`ShardScheduler` owns everything about running shards on Ray and nothing about what a shard is:

* **sizing** (:func:`plan_workers`): one worker per GPU share, or per CPU pair without GPUs; a request that no node
  of the cluster can host fails at once (:class:`SchedulingError`) instead of waiting forever; with
  ``ray.pools: split`` those are model workers and the shards go to CPU workers (:mod:`pipelines.pools`);
* **start-up**: workers load their models; none ready after ``ray.worker_start_timeout_s`` is an error; every
  worker checks it sees the driver's output (shared-storage probe) before any shard is assigned;
* **assignment and retries** (on the driver): idle workers take the next shard; a shard whose worker dies is
  retried ``ray.max_shard_retries`` times; a worker that fails that many shards in a row leaves the pool. A worker
  whose process or node died is not given work again until it answers a ping (Ray restarts it, on another node if
  its node is gone); shards go to the workers that answer, so losing a node loses at most its in-flight shards,
  which the surviving nodes rebuild. A build whose workers all stay unreachable for
  ``ray.worker_start_timeout_s`` leaves the remaining shards uncommitted (a rerun builds them);
* **progress**: a ``num_cpus=0`` tracker actor collects per-batch counts, shown by :class:`BuildProgress`. It is
  pinned to the driver's node (the head, for a job) and restarted if its process dies, so losing a worker node
  never loses it; the counts are informative only and a tracker that does not answer never stops the build;
* **teardown**: every actor is killed at the end, after an error and after SIGINT/SIGTERM
  (:class:`~cnc.ray_session.Interrupted`), so in-flight shards are abandoned uncommitted.
"""

from __future__ import annotations

import collections
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from cnc.base.errors import UserError, one_line
from cnc.ray_session import Interrupted
from pipelines.plan import shard_size
from pipelines.pools import ModelWorker, choose_pools, plan_cpu_workers
from pipelines.progress import BuildProgress
from triplets.config import BuildConfig

log = logging.getLogger(__name__)


class SchedulingError(UserError):
    """No worker can be placed or started on this cluster with the configured resources."""


def start_model_workers(cfg, resolved: dict, n: int, gpus: float, threads: int, fault: dict | None) -> list:
    """(``ray.pools: split``) Start ``n`` :class:`~pipelines.pools.ModelWorker` actors (``gpus`` GPU and
    ``ray.cpus_per_worker`` CPUs each); returns their handles once one of them has loaded its models.

    Raises:
        pipelines.scheduler.SchedulingError: none ready within ``ray.worker_start_timeout_s``.
    """
    import ray  # lazy: ray is heavy; the driver imports it once a build starts

    rc = cfg.ray
    actor_cls = ray.remote(ModelWorker).options(num_cpus=rc.cpus_per_worker, num_gpus=gpus, max_restarts=-1,
                                               max_task_retries=0)
    cfg_json = cfg.model_dump(mode="json")
    actors = [actor_cls.remote(cfg_json, resolved, threads, fault) for _ in range(n)]
    ready, _ = ray.wait([a.ready.remote() for a in actors], num_returns=1, timeout=rc.worker_start_timeout_s)
    if not ready:
        raise SchedulingError(f"no model worker started within ray.worker_start_timeout_s="
                              f"{rc.worker_start_timeout_s:g} s (resources busy, or the models fail to load: see the "
                              f"Ray logs)")
    return actors


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
        raise SchedulingError(f"device={cfg.device} but the Ray cluster has no GPU")
    if use_gpu:
        n = rc.num_workers or max(1, math.floor(gpus / rc.gpus_per_worker + 1e-9))
    else:
        n = rc.num_workers or max(1, int(cpus // 2))
        n = min(n, max(1, int(cpus // rc.cpus_per_worker)))
    threads = rc.torch_threads or max(1, int(rc.cpus_per_worker))
    return max(1, min(n, nshards)), (rc.gpus_per_worker if use_gpu else 0.0), threads


def check_placeable(nodes: list[dict], cpus: float, gpus: float) -> None:
    """Raise :class:`SchedulingError` unless some alive node has ``cpus`` CPUs and ``gpus`` GPUs in total."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", n.get("alive", True))]
    if any(r.get("CPU", 0) + 1e-9 >= cpus and r.get("GPU", 0) + 1e-9 >= gpus for r in alive):
        return
    most_cpu = max((r.get("CPU", 0) for r in alive), default=0)
    most_gpu = max((r.get("GPU", 0) for r in alive), default=0)
    raise SchedulingError(
        f"no Ray node can host a worker: it needs {cpus:g} CPU(s) (ray.cpus_per_worker) and {gpus:g} GPU(s) "
        f"(ray.gpus_per_worker), the largest node has {most_cpu:g} CPU(s) and {most_gpu:g} GPU(s)")


@dataclass
class ScheduleResult:
    """What a :meth:`ShardScheduler.run` produced."""

    markers: dict[int, dict] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)  # why a lost shard was not committed (one line)
    interrupted: Interrupted | None = None


class ProgressTracker:
    """Tiny Ray actor (``num_cpus=0``) collecting per-shard progress from the workers.

    Each shard keeps the counts of its latest attempt, so a retried shard is not counted twice.
    """

    def __init__(self) -> None:
        self.shards: dict[int, tuple[int, int, int]] = {}

    def update(self, shard: int, attempt: int, done: int, failed: int) -> None:
        cur = self.shards.get(shard)
        if cur is None or attempt >= cur[0]:
            self.shards[shard] = (attempt, done, failed)

    def totals(self) -> tuple[int, int]:
        """``(items done, items failed)`` over all shards reported so far."""
        return sum(v[1] for v in self.shards.values()), sum(v[2] for v in self.shards.values())


class ShardScheduler:
    """Runs shard specs on a pool of worker actors (see the module docstring).

    Args:
        cfg: the build config.
        resolved: model resolution (:func:`triplets.builder.resolve_models`).
        fingerprint: the plan fingerprint (recorded in markers).
        output: the output URL or path.
        probe: the shared-storage probe file of a local output (``None`` for object stores).
        fault: test-only fault injection.
    """

    def __init__(self, cfg: BuildConfig, resolved: dict, fingerprint: str, output: str, probe: str | None,
                 fault: dict | None = None):
        self.cfg, self.resolved, self.fingerprint = cfg, resolved, fingerprint
        self.output, self.probe, self.fault = output, probe, fault
        self.actors: list = []
        self.model_actors: list = []  # ray.pools: split (pipelines.pools)
        self.tracker = None
        self._totals = (0, 0)  # the tracker's last answer

    def _start_tracker(self) -> str:
        """The progress tracker on the driver's node (never on a worker node that can be lost); returns its name."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = f"cnc-build-progress-{uuid.uuid4().hex[:12]}"
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.tracker = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(ProgressTracker).options(
            name=name, scheduling_strategy=here).remote()
        ray.get(self.tracker.totals.remote())  # registered before any worker looks it up by name
        return name

    def totals(self) -> tuple[int, int]:
        """``(items done, items failed)`` from the tracker, or its last answer when it does not answer now."""
        import ray

        try:
            self._totals = ray.get(self.tracker.totals.remote(), timeout=5.0)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            log.debug("progress tracker did not answer (%s); showing its last counts", type(exc).__name__)
        return self._totals

    def _start(self, nshards: int) -> None:
        import ray

        from pipelines.worker import ShardWorker

        rc = self.cfg.ray
        resources = ray.cluster_resources()
        nworkers, gpus, threads = plan_workers(self.cfg, resources, nshards)
        split = choose_pools(self.cfg, resources, nworkers, gpus) == "split"
        if split:  # a shard's batches spread over every model worker: not capped by the shard count
            nworkers, gpus, threads = plan_workers(self.cfg, resources, nshards * rc.batches_in_flight)
        check_placeable(ray.nodes(), rc.cpus_per_worker, gpus)
        log.info("ray.pools=%s -> %s; starting %d %sworker(s): %s GPU, %s CPU, %d torch thread(s) each", rc.pools,
                 "split" if split else "single", nworkers, "model " if split else "", gpus, rc.cpus_per_worker,
                 threads)
        cpus, worker_gpus = rc.cpus_per_worker, gpus
        if split:  # model workers run the models; the shard workers below do the rest on CPUs (pipelines.pools)
            self.model_actors = start_model_workers(self.cfg, self.resolved, nworkers, gpus, threads, self.fault)
            nworkers = plan_cpu_workers(self.cfg, resources, len(self.model_actors), nshards)
            cpus, worker_gpus, threads = rc.cpus_per_cpu_worker, 0.0, 1
            check_placeable(ray.nodes(), cpus, 0.0)
            log.info("starting %d CPU worker(s): %s CPU each, %d batch(es) in flight each", nworkers, cpus,
                     rc.batches_in_flight)
        tracker_name = self._start_tracker()
        actor_cls = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=worker_gpus, max_restarts=-1,
                                                   max_task_retries=0)
        cfg_json = self.cfg.model_dump(mode="json")
        self.actors = [actor_cls.remote(cfg_json, self.resolved, self.fingerprint, threads, tracker_name,
                                        self.fault, self.output, self.model_actors or None, i)
                       for i in range(nworkers)]
        checks = {a.check_output.remote(self.probe): a for a in self.actors}
        ready, _ = ray.wait(list(checks), num_returns=1, timeout=rc.worker_start_timeout_s)
        if not ready:
            raise SchedulingError(f"no worker started within ray.worker_start_timeout_s={rc.worker_start_timeout_s:g} "
                                  f"s (resources busy, or the models fail to load: see the Ray logs)")
        for ref in checks:  # every worker: raises OutputNotSharedError from a node without the output
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                if isinstance(cause, UserError):
                    raise UserError(str(cause).strip().splitlines()[-1]) from None
                raise

    def run(self, specs: dict[int, dict], todo: list[tuple[int, bool]], progress: bool | None) -> ScheduleResult:
        """Build shards ``todo`` (``(shard, reuse_committed)``); returns committed markers and lost shards."""
        import ray

        rc = self.cfg.ray
        result = ScheduleResult()
        total = sum(shard_size(specs[s]) for s, _ in todo)
        bar = BuildProgress(total, progress, rc.progress_interval_s)
        pending = collections.deque(todo)
        inflight: dict = {}  # build_shard ref -> (worker, shard, reuse)
        probing: dict = {}  # ping ref -> worker whose process or node died: idle again once it answers
        try:
            self._start(len(todo))
            attempts: dict[int, int] = collections.Counter()
            strikes: dict[int, int] = collections.Counter()  # consecutive failures per actor
            idle = list(range(len(self.actors)))
            stalled_since: float | None = None  # since when no worker could take the pending shards
            while pending or inflight:
                while idle and pending:
                    a = idle.pop(0)
                    shard, reuse = pending.popleft()
                    ref = self.actors[a].build_shard.remote(specs[shard], self.output, attempts[shard], reuse)
                    inflight[ref] = (a, shard, reuse)
                ready, _ = ray.wait([*inflight, *probing], num_returns=1, timeout=min(rc.progress_interval_s, 10.0))
                for ref in ready:
                    if ref in probing:
                        self._on_ping(ref, probing.pop(ref), idle, probing)
                        continue
                    a, shard, reuse = inflight.pop(ref)
                    try:
                        result.markers[shard] = ray.get(ref)
                        strikes[a] = 0
                    except ray.exceptions.RayError as exc:
                        attempts[shard] += 1
                        strikes[a] += 1
                        self._on_failure(shard, attempts[shard], exc, pending, reuse, result)
                        if strikes[a] > rc.max_shard_retries:
                            log.error("worker %d failed %d shards in a row; removed from the pool", a, strikes[a])
                        elif not isinstance(exc, ray.exceptions.RayTaskError):  # its process (or node) died
                            probing[self.actors[a].worker_info.remote()] = a
                        else:
                            idle.append(a)
                        continue
                    idle.append(a)
                if pending and not inflight and not idle:
                    stalled_since = stalled_since or time.monotonic()
                    waited = time.monotonic() - stalled_since
                    if not probing or waited > rc.worker_start_timeout_s:
                        why = (f"no worker answered for {waited:.0f} s (ray.worker_start_timeout_s)" if probing
                               else "no worker left")
                        log.error("%s; %d shard(s) not built", why, len(pending))
                        for s, _ in pending:
                            result.reasons.setdefault(s, why)
                        result.lost += [s for s, _ in pending]
                        pending.clear()
                else:
                    stalled_since = None
                n_done, n_failed = self.totals()
                bar.update(n_done, n_failed, len(result.markers), len(todo))
        except Interrupted as exc:
            log.warning("%s: stopping; %d shard(s) in flight are abandoned uncommitted", exc, len(inflight))
            result.interrupted = exc
            result.lost += sorted({s for _, s, _ in inflight.values()} | {s for s, _ in pending})
        finally:
            bar.close()
            self.close()
        result.lost = sorted(set(result.lost))
        return result

    def _on_ping(self, ref, a: int, idle: list[int], probing: dict) -> None:
        """A ping of worker ``a`` (whose process died) returned: idle again, or gone for good."""
        import ray

        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # not reachable yet (restarting): ask again
            time.sleep(0.2)
            probing[self.actors[a].worker_info.remote()] = a
            return
        except ray.exceptions.RayError as exc:
            log.error("worker %d cannot be restarted (%s); removed from the pool", a, one_line(exc))
            return
        log.info("worker %d answers again; it takes shards again", a)
        idle.append(a)

    def _on_failure(self, shard: int, attempt: int, exc: Exception, pending: collections.deque, reuse: bool,
                    result: ScheduleResult) -> None:
        reason = shard_failure_reason(exc)
        if attempt <= self.cfg.ray.max_shard_retries:
            log.warning("shard %06d failed on attempt %d (%s); retrying", shard, attempt, reason)
            pending.appendleft((shard, reuse))
        else:
            log.error("shard %06d failed %d times (%s); left uncommitted, a rerun retries it", shard, attempt, reason)
            result.lost.append(shard)
            result.reasons[shard] = reason

    def close(self) -> None:
        """Kill every actor of this scheduler (idempotent)."""
        import ray

        for actor in [*self.actors, *self.model_actors, self.tracker]:
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.actors, self.model_actors, self.tracker = [], [], None


def shard_failure_reason(exc: BaseException) -> str:
    """One line saying why a shard attempt failed: the worker's own exception for a task error (an ``OSError``
    keeps errno and path, ENOSPC reads "disk full at PATH"), else Ray's reason (worker or node died)."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayTaskError):
            return one_line(cause)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        if lines:  # Ray's text ends with the worker's "Type: message" line
            return lines[-1][:300]
    return one_line(exc)

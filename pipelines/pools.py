"""Where a shard's model stages run: in the shard worker, or on a pool of model workers (``ray.pools``; ``auto``,
the default, picks ``split`` on GPU clusters with CPUs to spare and ``single`` otherwise: :func:`choose_pools`).

* ``single`` (:class:`LocalModels`): one actor per GPU fetches, decodes, runs the models, encodes and writes; its
  prefetch and writer threads overlap with the models on that GPU node's CPUs.
* ``split`` (:class:`RemoteModels` + :class:`ModelWorker`): **model workers** (one per GPU share) run only the model
  stages; **CPU workers** (shard workers without models, placed on any node, CPU-only nodes included) own the
  shards: fetch, decode, encode, write and commit through the shard sink, exactly as in ``single``. A CPU worker
  sends each decoded batch to the model workers (round robin, so one shard uses every GPU and the queues stay
  even) and keeps ``ray.batches_in_flight`` batches queued there; Ray passes the batches and results as object refs
  (numpy arrays, zero-copy on one node) and each model worker runs its calls one at a time in arrival order. The
  queues are bounded by CPU workers x ``batches_in_flight`` batches.

Both paths batch the same items the same way and run the same stage code (:func:`run_models`), so the tars are
byte-identical. A model worker that dies fails the batches queued on it; the CPU worker's shard attempt fails and
the scheduler retries it like any other (the model worker restarts), so commits stay exactly once.

Sizing (:func:`plan_cpu_workers`): model workers as :func:`pipelines.scheduler.plan_workers` (one per
``ray.gpus_per_worker``), each with ``ray.cpus_per_worker`` CPUs for torch; CPU workers ``ray.cpu_workers`` or every
CPU left over divided by ``ray.cpus_per_cpu_worker``, at most one per shard.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
import time

from cnc.logs import quiet_library_progress
from pipelines.faults import FaultInjection
from triplets.config import BuildConfig

log = logging.getLogger(__name__)


def run_models(builder, batch: dict, delay_s: float = 0.0) -> tuple[dict, dict[str, float]]:
    """The builder's model stages on a decoded batch: ``(batch, seconds per stage)``.

    ``delay_s`` (fault injection ``model_delay_s``, benchmarks only) adds a sleep that stands for GPU time, recorded
    as stage ``simulated_model``.
    """
    seconds: collections.Counter = collections.Counter()
    batch = builder.run_models(batch, seconds)
    if delay_s:
        t = time.perf_counter()
        time.sleep(delay_s)
        seconds["simulated_model"] += time.perf_counter() - t
    return batch, dict(seconds)


class LocalModels:
    """The models of this process, one batch at a time (``ray.pools: single``)."""

    depth = 0  # results are ready when submit returns

    def __init__(self, builder, delay_s: float = 0.0):
        self.builder, self.delay_s = builder, delay_s

    def submit(self, batch: dict) -> tuple[dict, dict]:
        return run_models(self.builder, batch, self.delay_s)

    @staticmethod
    def result(handle: tuple[dict, dict]) -> tuple[dict, dict]:
        return handle


class RemoteModels:
    """Model workers' actor handles: batches round robin, up to ``depth`` queued per shard (``ray.pools: split``).

    Args:
        actors: :class:`ModelWorker` actor handles.
        depth: batches a shard worker keeps queued (``ray.batches_in_flight``).
        start: the first model worker used (spreads shard workers over the pool).
    """

    def __init__(self, actors: list, depth: int, start: int = 0):
        self.actors, self.depth, self.next = list(actors), max(1, depth), start

    def submit(self, batch: dict):
        actor = self.actors[self.next % len(self.actors)]
        self.next += 1
        return actor.run_models.remote(batch)

    @staticmethod
    def result(ref) -> tuple[dict, dict]:
        import ray

        return ray.get(ref)


class ModelWorker:
    """A Ray actor holding one model set and running only the model stages (``ray.pools: split``).

    Args: as :class:`pipelines.worker.ShardWorker` (``cfg`` as a JSON dict, the resolved models, torch threads,
        test-only fault injection).
    """

    def __init__(self, cfg: dict, resolved: dict[str, str], torch_threads: int = 1,
                 fault_injection: dict | None = None):
        import torch

        from triplets.builder import TripletBuilder  # lazy: torch and the model stages, on model workers only

        torch.set_num_threads(max(1, torch_threads))
        quiet_library_progress()
        t0 = time.perf_counter()
        self.builder = TripletBuilder(BuildConfig.model_validate(cfg), resolved)
        self.delay_s = FaultInjection(fault_injection).model_delay
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "torch_threads": torch.get_num_threads(),
                     "load_seconds": round(time.perf_counter() - t0, 3)}
        log.info("model worker %s ready", self.info)

    def ready(self) -> dict:
        """Where this model worker runs (answers once the models are loaded)."""
        return dict(self.info)

    def identities(self) -> dict:
        """The loaded models' identities (:func:`triplets.builder.model_identities`), for the CPU workers."""
        return self.builder.models

    def run_models(self, batch: dict) -> tuple[dict, dict]:
        return run_models(self.builder, batch, self.delay_s)


def choose_pools(cfg, resources: dict, model_workers: int, gpus_per_worker: float) -> str:
    """``single`` or ``split`` for this build: ``ray.pools``, or for ``auto`` split when the model workers use GPUs
    and the cluster has CPUs left for at least one CPU worker (measured better: docs/benchmarks.md), else single
    (without GPUs the models run on CPUs anyway, and splitting only adds transfers)."""
    rc = cfg.ray
    if rc.pools != "auto":
        return rc.pools
    free = float(resources.get("CPU", 0)) - model_workers * rc.cpus_per_worker
    return "split" if gpus_per_worker > 0 and free + 1e-9 >= rc.cpus_per_cpu_worker else "single"


def plan_cpu_workers(cfg, resources: dict, model_workers: int, nshards: int) -> int:
    """CPU workers of a split build: ``ray.cpu_workers``, else the CPUs the model workers leave free divided by
    ``ray.cpus_per_cpu_worker`` (at least one), never more than shards to build."""
    rc = cfg.ray
    if rc.cpu_workers:
        n = rc.cpu_workers
    else:
        free = float(resources.get("CPU", 1)) - model_workers * rc.cpus_per_worker
        n = max(1, math.floor(free / rc.cpus_per_cpu_worker + 1e-9))
    return max(1, min(n, nshards))


__all__ = ["LocalModels", "ModelWorker", "RemoteModels", "choose_pools", "plan_cpu_workers", "run_models"]

"""The shard worker: one model set, whole shards in, committed shards out.

:class:`ShardWorker` is a plain class (Ray wraps it as an actor in :mod:`pipelines.scheduler`; tests can run it
in-process). It loads :class:`~triplets.builder.TripletBuilder` once and builds a shard spec in batches through a
three-step pipeline so CPU work never stalls the models::

    prefetch thread   builder.decode(batch i+1)        read, decode, resize
    caller thread     builder.run_models(batch i)      segment → inpaint → depth → embed → quality (the GPU stages)
    writer thread     builder.assemble(batch i-1) with its quality statistics, then encode, both on the
                      ``ray.encode_threads`` encode threads, and append, in plan order, to the shard's
                      :class:`~pipelines.sink.ShardSink`

The sink stages the tar locally and commits it through :class:`triplets.shardio.BuildOutput` (tar → errors →
marker), on local disk or an object store alike.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from pipelines.sink import ShardSink
from triplets.config import BuildConfig
from triplets.readers import ReadOptions, shard_items
from triplets.shardio import BuildOutput, ShardMarker, ShardStats, TarStream, check_probe, tar_keys
from triplets.shardio.records import count_failures

log = logging.getLogger(__name__)


class FaultInjection:
    """Test-only fault hooks (``CNC_TEST_FAULT_INJECTION`` JSON or ``run_build(fault_injection=...)``).

    Keys: ``kill_shard`` (id) + ``kill_after_batches`` (default 1): the worker process calls
    ``os._exit(1)`` after that many batches of that shard on its first attempt, as a crash
    would. ``batch_delay_s``: sleep after every batch (slows a build down for kill tests).
    ``hide_probe``: the worker looks for the shared-storage probe under another name, as a worker on a node
    without the driver's folder would.
    """

    def __init__(self, spec: dict | None):
        spec = spec or {}
        self.kill_shard = spec.get("kill_shard")
        self.kill_after = int(spec.get("kill_after_batches", 1))
        self.delay = float(spec.get("batch_delay_s", 0.0))
        self.hide_probe = bool(spec.get("hide_probe", False))

    def after_batch(self, shard: int, attempt: int, batches_done: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.kill_shard == shard and attempt == 0 and batches_done >= self.kill_after:
            log.warning("fault injection: killing worker pid %d in shard %d", os.getpid(), shard)
            os._exit(1)


class ShardWorker:
    """Builds whole shards with one set of models.

    Args:
        cfg: the build config as a JSON dict (``BuildConfig.model_dump(mode="json")``).
        resolved: output of :func:`triplets.builder.resolve_models`.
        fingerprint: the plan fingerprint recorded in every marker.
        torch_threads: ``torch.set_num_threads`` of this worker.
        progress: name of a Ray :class:`ProgressTracker` actor (or its handle) told about every batch. A name,
            not a handle, so the actor's constructor arguments stay out of the object store (restarts
            must not depend on them, ray-project/ray#53727).
        fault_injection: test-only hooks, see :class:`FaultInjection`.
    """

    def __init__(self, cfg: dict, resolved: dict[str, str], fingerprint: str, torch_threads: int = 1,
                 progress: str | Any = None, fault_injection: dict | None = None, output: str | None = None):
        import torch

        torch.set_num_threads(max(1, torch_threads))
        from cnc.logs import quiet_library_progress
        from triplets.builder import TripletBuilder

        quiet_library_progress()  # worker logs are not terminals: no "Loading weights" bars in the driver's output

        t0 = time.perf_counter()
        self.cfg = BuildConfig.model_validate(cfg)
        self.read_options = ReadOptions.from_config(self.cfg)
        self.builder = TripletBuilder(self.cfg, resolved)
        self.fingerprint = fingerprint
        self.output = BuildOutput(output, self.cfg.storage.scratch_dir) if output is not None else None
        if isinstance(progress, str):
            import ray

            progress = ray.get_actor(progress)
        self.progress = progress
        self.fault = FaultInjection(fault_injection)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "device": self._device(),
                     "torch_threads": torch.get_num_threads(), "load_seconds": round(time.perf_counter() - t0, 3)}
        self.info.update(self._ray_ids())
        log.info("worker %s ready in %.1f s", self.info, self.info["load_seconds"])

    def check_output(self, probe: str | None) -> None:
        """Raise :class:`~triplets.shardio.OutputNotSharedError` when this node cannot see the driver's probe file."""
        check_probe(probe + ".hidden" if probe and self.fault.hide_probe else probe)

    def _device(self) -> str:
        for stage in self.builder.model_stages:
            if getattr(stage, "device", None):
                return str(stage.device)
        return str(self.cfg.device)

    @staticmethod
    def _ray_ids() -> dict:
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                return {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id()}
        except Exception:  # noqa: BLE001 - ids are informative only
            pass
        return {}

    def worker_info(self) -> dict:
        """Where this worker runs (pid, host, node/actor id, device, model load seconds)."""
        return dict(self.info)

    # -- one shard -----------------------------------------------------------------------
    def build_shard(self, spec: dict, output: str | None = None, attempt: int = 0,
                    reuse_committed: bool = False) -> ShardMarker:
        """Build and commit shard ``spec`` (a plan's shard spec: items or row ranges); return its marker.

        ``output`` (path or URL) defaults to the worker's. With ``reuse_committed`` the samples of the committed tar
        are copied byte for byte and only its missing items (the failures) are computed again (``--retry-failed``).
        """
        out = BuildOutput(output, self.cfg.storage.scratch_dir) if output is not None else self.output
        shard, items = int(spec["shard"]), shard_items(spec, self.read_options)  # this shard's items only, read now
        start_wall, t0, cpu0 = datetime.now(timezone.utc), time.perf_counter(), time.process_time()
        old_tar = out.tar(shard)
        reused_keys = set(tar_keys(old_tar.url)) if reuse_committed and old_tar.exists() else set()
        reused_iter = self._reused_samples(old_tar.url) if reused_keys else iter(())
        with ShardSink(out, shard) as sink:
            # 1. stream every sample, in plan order, into the sink's staging tar
            failures, stage_seconds = self._stream(sink, shard, attempt, items, reused_keys, reused_iter)
            if sink.written + len(failures) != len(items):
                raise RuntimeError(f"shard {shard}: {sink.written} samples + {len(failures)} failures != "
                                   f"{len(items)} planned items")
            # 2. commit: tar, errors, marker
            failures.sort(key=lambda r: r["key"])
            by_stage, by_reason = count_failures(failures)
            stats = ShardStats(
                shard=shard, name=spec["name"], fingerprint=self.fingerprint, attempt=attempt, nitems=len(items),
                nsamples=sink.written, nfailed=len(failures), nreused=len(reused_keys), failures_by_stage=by_stage,
                failures_by_reason=by_reason, seconds=round(time.perf_counter() - t0, 4),
                cpu_seconds=round(time.process_time() - cpu0, 4),  # all threads of the worker process
                stage_seconds={k: round(v, 4) for k, v in sorted(stage_seconds.items())},
                start_time=start_wall.isoformat(timespec="milliseconds"),
                end_time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                started_at=start_wall.timestamp(), finished_at=time.time(), worker=self.worker_info(),
                models=self.builder.models,
            )
            return sink.commit(failures, stats)

    def _stream(self, sink: ShardSink, shard: int, attempt: int, items: list[dict], reused_keys: set[str],
                reused_iter: Iterator[dict]) -> tuple[list[dict], collections.Counter]:
        """Decode (prefetch thread) → models (this thread) → encode + write (writer thread), batch by batch.

        Returns ``(failure rows, seconds per stage)``.
        """
        todo = [it for it in items if it["key"] not in reused_keys]
        bs = self.cfg.batch_size
        batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
        stage_seconds: collections.Counter = collections.Counter()
        failures: list[dict] = []
        order, pending_write = iter(items), None
        with ThreadPoolExecutor(1, "cnc-decode") as decoder, ThreadPoolExecutor(1, "cnc-write") as writer, \
                ThreadPoolExecutor(self.cfg.ray.encode_threads, "cnc-encode") as encoder:
            next_decoded = decoder.submit(self._decode, batches[0]) if batches else None
            for b, chunk in enumerate(batches):
                batch, decode_s = next_decoded.result()
                stage_seconds["decode"] += decode_s
                next_decoded = decoder.submit(self._decode, batches[b + 1]) if b + 1 < len(batches) else None
                batch = self.builder.run_models(batch, stage_seconds)
                if pending_write is not None:
                    self._collect(pending_write, failures, stage_seconds)
                pending_write = writer.submit(self._assemble_and_write, sink, order, reused_iter,
                                              [it["key"] for it in chunk], batch, encoder)
                self._report(shard, attempt, len(reused_keys) + sum(len(c) for c in batches[:b + 1]), len(failures))
                self.fault.after_batch(shard, attempt, b + 1)
            if pending_write is not None:
                self._collect(pending_write, failures, stage_seconds)
        self._write(sink, order, reused_iter, [], [])  # reused samples after the last computed one
        return failures, stage_seconds

    def _decode(self, chunk: list[dict]) -> tuple[dict, float]:
        t = time.perf_counter()
        batch = self.builder.decode(chunk)
        return batch, time.perf_counter() - t

    @staticmethod
    def _collect(future, failures: list[dict], stage_seconds: collections.Counter) -> int:
        fails, encode_s, write_s, quality_s = future.result()
        failures += fails
        stage_seconds["encode"] += encode_s
        stage_seconds["write"] += write_s
        if quality_s:
            stage_seconds["quality_stats"] += quality_s

    def _assemble_and_write(self, sink: ShardSink, order: Iterator[dict], reused: Iterator[dict], keys: list[str],
                            batch: dict, encoder: ThreadPoolExecutor) -> tuple:
        """Writer thread: the batch's samples (quality statistics on the encode threads, off the model thread),
        then :meth:`_write`. Returns ``(model-stage and encode failures, encode_s, write_s, quality_stats_s)``."""
        seconds: collections.Counter = collections.Counter()
        samples, fails = self.builder.assemble(batch, encoder, seconds)
        encode_fails, enc_s, wr_s = self._write(sink, order, reused, keys, samples, encoder)
        return fails + encode_fails, enc_s, wr_s, seconds["quality_stats"]

    @staticmethod
    def _reused_samples(url: str) -> Iterator[dict]:
        for raw in TarStream(url).samples():
            yield {k: v for k, v in raw.items() if not k.startswith("_") or k == "__key__"}

    def _write(self, sink: ShardSink, order: Iterator[dict], reused: Iterator[dict], keys: list[str],
               samples: list, encoder: ThreadPoolExecutor | None = None) -> tuple:
        """Append, in plan order, the reused samples before each of ``keys`` and the new ``samples``.

        Runs in the writer thread; the samples are encoded (JPEG/PNG, the costly part) in parallel on ``encoder``'s
        threads (``ray.encode_threads``) and appended in plan order, so the tar bytes do not depend on the thread
        count. Returns ``(encode_failures, encode_s, write_s)`` (``encode_s``: wall seconds of the encode phase).
        """
        fails, wr_s = [], 0.0
        t = time.perf_counter()
        results = list(encoder.map(self._encode, samples) if encoder is not None else map(self._encode, samples))
        enc_s = time.perf_counter() - t
        by_key = {s.key: (s, r) for s, r in zip(samples, results)}

        def _flush_reused(until: str | None) -> None:
            for item in order:
                if item["key"] == until:
                    return
                raw = next(reused)
                if raw["__key__"] != item["key"]:
                    raise RuntimeError(f"reused tar out of plan order: {raw['__key__']} vs {item['key']}")
                sink.write(raw)
            if until is not None:
                raise RuntimeError(f"key {until} not found in plan order")

        for key in keys:
            t = time.perf_counter()
            _flush_reused(key)
            wr_s += time.perf_counter() - t
            if key not in by_key:
                continue  # failed in a model stage: already in the failures
            sample, encoded = by_key[key]
            if isinstance(encoded, Exception):  # a malformed sample is quarantined, not fatal
                fails.append({"key": key, "source": sample.meta.get("source"), "stage": "encode",
                              "reason": str(encoded)[:300]})
                continue
            t = time.perf_counter()
            sink.write(encoded)
            wr_s += time.perf_counter() - t
        if not keys:
            t = time.perf_counter()
            _flush_reused(None)
            wr_s += time.perf_counter() - t
        return fails, enc_s, wr_s

    def _encode(self, sample) -> dict | Exception:
        """One sample's WebDataset dict, or the exception that made it unencodable (thread-safe, deterministic)."""
        from triplets.sample import encode_sample

        try:
            return encode_sample(sample, self.cfg.jpeg_quality)
        except Exception as exc:  # noqa: BLE001 - reported per sample by _write
            return exc

    def _report(self, shard: int, attempt: int, done: int, failed: int) -> None:
        if self.progress is not None:
            self.progress.update.remote(shard, attempt, done, failed)

"""Test-only fault injection of the build's workers (a killed worker, a slow batch, a hidden probe, model time)."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


class FaultInjection:
    """Test-only fault hooks (``CNC_TEST_FAULT_INJECTION`` JSON or ``run_build(fault_injection=...)``).

    Keys: ``kill_shard`` (id) + ``kill_after_batches`` (default 1): the worker process calls
    ``os._exit(1)`` after that many batches of that shard on its first attempt, as a crash
    would. ``batch_delay_s``: sleep after every batch (slows a build down for kill tests).
    ``hide_probe``: the worker looks for the shared-storage probe under another name, as a worker on a node
    without the driver's folder would. ``model_delay_s``: sleep after the model stages of every batch, where they
    run (stands for GPU time in benchmarks/pool_throughput.py; recorded as stage ``simulated_model``).
    """

    def __init__(self, spec: dict | None):
        spec = spec or {}
        self.kill_shard = spec.get("kill_shard")
        self.kill_after = int(spec.get("kill_after_batches", 1))
        self.delay = float(spec.get("batch_delay_s", 0.0))
        self.model_delay = float(spec.get("model_delay_s", 0.0))
        self.hide_probe = bool(spec.get("hide_probe", False))

    def after_batch(self, shard: int, attempt: int, batches_done: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.kill_shard == shard and attempt == 0 and batches_done >= self.kill_after:
            log.warning("fault injection: killing worker pid %d in shard %d", os.getpid(), shard)
            os._exit(1)

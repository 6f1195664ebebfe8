"""The shard scheduler (:mod:`pipelines.scheduler`) without Ray: worker counts, GPU shares and torch threads."""

from __future__ import annotations

import pytest

from triplets.config import BuildConfig


def _cfg(**kw) -> BuildConfig:
    return BuildConfig(samples_per_shard=2, **kw)


def test_plan_workers_rules():
    from pipelines.scheduler import SchedulingError, plan_workers

    cpu = _cfg()
    assert plan_workers(cpu, {"CPU": 2}, 10) == (1, 0.0, 1)
    assert plan_workers(cpu, {"CPU": 16}, 10) == (8, 0.0, 1)
    assert plan_workers(cpu, {"CPU": 16}, 3) == (3, 0.0, 1)
    assert plan_workers(cpu, {"CPU": 16, "GPU": 4}, 10) == (4, 1.0, 1)
    half = _cfg(ray={"gpus_per_worker": 0.5, "torch_threads": 4})
    assert plan_workers(half, {"CPU": 16, "GPU": 2}, 10) == (4, 0.5, 4)
    assert plan_workers(_cfg(device="cpu"), {"CPU": 4, "GPU": 2}, 10) == (2, 0.0, 1)
    with pytest.raises(SchedulingError, match="no GPU"):
        plan_workers(_cfg(device="cuda"), {"CPU": 4}, 1)

"""``ray.pools: split``: model workers + CPU workers give the one-actor design's bytes, exactly once (real local Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnc.config import load_config
from pipelines.build import run_build
from pipelines.pools import plan_cpu_workers
from tests.support import FAST_BUILD, TINY_CONFIG
from triplets.config import BuildConfig
from triplets.shardio import file_sha256, iter_samples

LENIENT = FAST_BUILD + ["max_failure_fraction=0.5"]


def _cfg(*extra: str) -> BuildConfig:
    return load_config(BuildConfig, TINY_CONFIG, LENIENT + list(extra))


def _shas(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.glob("*.tar"))}


def test_cpu_workers_fill_the_cpus_the_model_workers_leave():
    cfg = _cfg("ray.cpus_per_worker=2", "ray.cpus_per_cpu_worker=1.5")
    assert plan_cpu_workers(cfg, {"CPU": 16, "GPU": 4}, model_workers=4, nshards=100) == 5  # (16 - 4 x 2) / 1.5
    assert plan_cpu_workers(cfg, {"CPU": 16}, model_workers=4, nshards=3) == 3  # never more than shards
    assert plan_cpu_workers(cfg, {"CPU": 8}, model_workers=4, nshards=9) == 1  # none left: still one
    assert plan_cpu_workers(_cfg("ray.cpu_workers=7"), {"CPU": 2}, model_workers=1, nshards=9) == 7


def test_auto_pools_split_only_gpu_clusters_with_cpus_to_spare():
    from pipelines.pools import choose_pools

    cfg = _cfg()  # ray.pools: auto
    assert choose_pools(cfg, {"CPU": 32, "GPU": 4}, model_workers=4, gpus_per_worker=1.0) == "split"
    assert choose_pools(cfg, {"CPU": 4, "GPU": 4}, model_workers=4, gpus_per_worker=1.0) == "single"  # no CPU left
    assert choose_pools(cfg, {"CPU": 32}, model_workers=16, gpus_per_worker=0.0) == "single"  # models on CPUs
    assert choose_pools(_cfg("ray.pools=split"), {"CPU": 2}, model_workers=1, gpus_per_worker=0.0) == "split"
    assert choose_pools(_cfg("ray.pools=single"), {"CPU": 32, "GPU": 4}, 4, 1.0) == "single"


@pytest.mark.ray
def test_split_pools_write_the_same_bytes_exactly_once(reference_build, tmp_path):
    """One model worker + two CPU workers (half a CPU each) on the session's 2-CPU Ray: every item lands once and the
    tars equal the one-actor build's (``reference_build``: 2 single workers)."""
    ref, _, src, photos = reference_build
    cfg = _cfg("ray.pools=split", "ray.num_workers=1", "ray.cpu_workers=2", "ray.cpus_per_cpu_worker=0.5")
    out = tmp_path / "split"
    result = run_build(cfg, str(src), out, progress=False)
    assert result.exit_code == 0 and result.shards_lost == []
    keys = [s.key for tar in sorted(out.glob("*.tar")) for s in iter_samples(str(tar))]
    errs = [json.loads(line)["key"] for f in sorted((out / "_cnc" / "errors").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert sorted(keys) == sorted(photos["good"]) and sorted(errs) == sorted(photos["bad"])
    assert _shas(out) == _shas(ref)
    markers = [json.loads(p.read_text()) for p in sorted((out / "_cnc").glob("*_stats.json"))]
    assert len({m["worker"]["pid"] for m in markers}) == 2  # both CPU workers built shards
    for m in markers:  # the shard worker loaded no model; the model stages ran (on the model worker)
        assert m["worker"]["model_stages"] == 0 and m["stage_seconds"]["inpaint"] > 0

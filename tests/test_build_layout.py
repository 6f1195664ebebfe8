"""Commit protocol, recovery and planning without Ray or models (fast)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from pipelines import layout
from pipelines.plan import PlanMismatchError, fingerprint, make_plan, prepare_plan
from pipelines.worker import count_reasons, open_tar_writer, tar_keys
from triplets.config import BuildConfig
from triplets.sample import TripletSample, encode_sample
from triplets.shards import encode_tar, file_sha256, iter_samples

FP = "f" * 16


def _sample(key: str, seed: int = 0, r: int = 16) -> TripletSample:
    rng = np.random.default_rng(seed)
    return TripletSample(
        key=key, image=rng.integers(0, 255, (r, r, 3), dtype=np.uint8), mask=(rng.random((r, r)) > 0.5).astype(np.uint8),
        background=rng.integers(0, 255, (r, r, 3), dtype=np.uint8),
        fg_depth=rng.integers(0, 65535, (r, r), dtype=np.uint16), bg_depth=rng.integers(0, 65535, (r, r), dtype=np.uint16),
        fg_emb=rng.standard_normal(8).astype(np.float32), bg_emb=rng.standard_normal(8).astype(np.float32),
        caption=f"caption {key}",
        meta={"key": key, "source": f"/x/{key}.jpg", "original_size": [r, r], "crop_box": [0, 0, r, r, 1.0],
              "resolution": r, "seed": seed, "models": {}, "mask_area": 0.5, "fg_depth_range": [0.0, 1.0],
              "bg_depth_range": [0.0, 1.0], "timings": {}, "version": "test"})


def _write_shard(out, shard: int, keys: list[str], failures: list[dict] | None = None, crash_after: int | None = None):
    """Commit a synthetic shard; ``crash_after`` = 0 (tmp written), 1 (tar renamed), 2 (errors written)."""
    tmp = layout.temp_path(layout.tar_path(out, shard))
    tmp.write_bytes(encode_tar([_sample(k, i) for i, k in enumerate(keys)]))
    failures = failures or []
    stats = {"shard": shard, "name": layout.shard_name(shard), "fingerprint": FP,
             "nitems": len(keys) + len(failures), "nsamples": len(keys), "nfailed": len(failures)}
    if crash_after is None:
        return layout.commit_shard(out, shard, tmp, failures, stats)

    class Crash(Exception):
        pass

    calls = {"n": 0}
    real_replace = layout.fsync_replace

    def replace(src, dst):
        if calls["n"] >= crash_after:
            raise Crash()
        calls["n"] += 1
        real_replace(src, dst)

    layout.fsync_replace = replace
    try:
        with pytest.raises(Crash):
            layout.commit_shard(out, shard, tmp, failures, stats)
    finally:
        layout.fsync_replace = real_replace
    return None


def test_streamed_tar_is_byte_identical_to_encode_tar(tmp_path):
    samples = [_sample(f"k{i}", i) for i in range(3)]
    path = tmp_path / "a.tar"
    with open(path, "wb") as f:
        tw = open_tar_writer(f)
        for s in samples:
            tw.write(encode_sample(s))
        tw.close()
    assert path.read_bytes() == encode_tar(samples)
    assert tar_keys(path) == ["k0", "k1", "k2"]


def test_commit_then_recover_keeps_committed_shard(tmp_path):
    marker = _write_shard(tmp_path, 0, ["a", "b"], [{"key": "c", "source": "s", "stage": "decode", "reason": "x"}])
    assert marker["sha256"] == file_sha256(tmp_path / "000000.tar")
    assert marker["url"] == "000000.tar" and marker["errors"] == "errors/000000.jsonl"
    rows = [json.loads(line) for line in (tmp_path / "errors" / "000000.jsonl").read_text().splitlines()]
    assert rows == [{"key": "c", "source": "s", "stage": "decode", "reason": "x"}]
    committed = layout.recover(tmp_path, FP, {0: 3})
    assert list(committed) == [0]
    assert [s.key for s in iter_samples(str(tmp_path / "000000.tar"))] == ["a", "b"]


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_crash_at_each_commit_step_leaves_nothing_committed(tmp_path, crash_after):
    _write_shard(tmp_path, 0, ["a"])
    _write_shard(tmp_path, 1, ["b", "c"], crash_after=crash_after)
    committed = layout.recover(tmp_path, FP, {0: 1, 1: 2})
    assert list(committed) == [0]
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["000000.jsonl", "000000.tar", "000000_stats.json"]


def test_recover_random_crash_states(tmp_path):
    """25 random interrupted states: only fully committed shards survive, each reads fully."""
    rng = random.Random(0)
    for trial in range(25):
        out = tmp_path / f"t{trial}"
        out.mkdir()
        expected, sizes = {}, {}
        for shard in range(4):
            keys = [f"s{shard}_{i}" for i in range(rng.randint(1, 3))]
            sizes[shard] = len(keys)
            state = rng.choice([None, 0, 1, 2, "corrupt", "missing-errors"])
            if state in (None, "corrupt", "missing-errors"):
                _write_shard(out, shard, keys)
                if state == "corrupt":
                    with open(out / f"{shard:06d}.tar", "r+b") as f:
                        f.seek(700)
                        f.write(b"X")
                elif state == "missing-errors":
                    (out / "errors" / f"{shard:06d}.jsonl").unlink()
                else:
                    expected[shard] = keys
            else:
                _write_shard(out, shard, keys, crash_after=state)
        committed = layout.recover(out, FP, sizes)
        for shard in range(4):
            tar = out / f"{shard:06d}.tar"
            if shard in committed:
                assert [s.key for s in iter_samples(str(tar))] == expected[shard]
            else:
                assert not tar.exists() and not (out / f"{shard:06d}_stats.json").exists()
        assert set(committed) == set(expected)
        assert not list(out.rglob("*.tmp"))


def test_recover_rejects_marker_of_other_plan_or_size(tmp_path):
    _write_shard(tmp_path, 0, ["a"])
    assert layout.recover(tmp_path, "0" * 16, {0: 1}) == {}
    assert not (tmp_path / "000000.tar").exists()
    _write_shard(tmp_path, 1, ["a"])
    assert layout.recover(tmp_path, FP, {1: 2}) == {}  # plan says 2 items


def _cfg(**kw) -> BuildConfig:
    return BuildConfig(samples_per_shard=2, **kw)


def _items(n: int) -> list[dict]:
    return [{"key": f"k{i}", "source": f"/in/k{i}.jpg", "caption": "", "mask_path": None, "mask_kind": None}
            for i in range(n)]


def test_plan_is_pure_and_split_by_samples_per_shard(tmp_path):
    p1 = make_plan(_items(5), _cfg(), "/in", "folder")
    assert [len(s["items"]) for s in p1["shards"]] == [2, 2, 1]
    assert [s["name"] for s in p1["shards"]] == ["000000", "000001", "000002"]
    assert json.dumps(p1, sort_keys=True) == json.dumps(make_plan(_items(5), _cfg(), "/in", "folder"), sort_keys=True)
    prepare_plan(tmp_path, p1)
    before = (tmp_path / "plan.json").read_bytes()
    prepare_plan(tmp_path, make_plan(_items(5), _cfg(ray={"num_workers": 7}, device="cpu"), "/in", "folder"))
    assert (tmp_path / "plan.json").read_bytes() == before  # operational keys do not matter


@pytest.mark.parametrize("change, message", [
    (dict(cfg=dict(seed=1)), "seed: 0 -> 1"),
    (dict(cfg=dict(samples_per_shard=3)), "samples_per_shard: 2 -> 3"),
    (dict(n=6), "had 5 items, now 6"),
    (dict(input="/other"), "another input"),
])
def test_plan_mismatch_is_refused_with_reason(tmp_path, change, message):
    prepare_plan(tmp_path, make_plan(_items(5), _cfg(), "/in", "folder"))
    cfg = BuildConfig(**({"samples_per_shard": 2} | change.get("cfg", {})))
    new = make_plan(_items(change.get("n", 5)), cfg, change.get("input", "/in"), "folder")
    with pytest.raises(PlanMismatchError, match=message.replace("(", r"\(")):
        prepare_plan(tmp_path, new)


def test_non_empty_folder_without_plan_is_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(PlanMismatchError, match="not empty"):
        prepare_plan(tmp_path, make_plan(_items(1), _cfg(), "/in", "folder"))
    assert (tmp_path / "holiday.jpg").exists()


def test_fingerprint_ignores_operational_keys_only():
    base = fingerprint(_cfg())
    assert fingerprint(_cfg(device="cuda", max_failure_fraction=0.5, ray={"num_workers": 3})) == base
    assert fingerprint(_cfg(batch_size=8)) != base
    assert fingerprint(_cfg(resolution=256)) != base


def test_plan_workers_rules():
    from pipelines.build import plan_workers

    cpu = _cfg()
    assert plan_workers(cpu, {"CPU": 2}, 10) == (1, 0.0, 1)
    assert plan_workers(cpu, {"CPU": 16}, 10) == (8, 0.0, 1)
    assert plan_workers(cpu, {"CPU": 16}, 3) == (3, 0.0, 1)
    assert plan_workers(cpu, {"CPU": 16, "GPU": 4}, 10) == (4, 1.0, 1)
    half = _cfg(ray={"gpus_per_worker": 0.5, "torch_threads": 4})
    assert plan_workers(half, {"CPU": 16, "GPU": 2}, 10) == (4, 0.5, 4)
    assert plan_workers(_cfg(device="cpu"), {"CPU": 4, "GPU": 2}, 10) == (2, 0.0, 1)
    with pytest.raises(RuntimeError, match="no GPU"):
        plan_workers(_cfg(device="cuda"), {"CPU": 4}, 1)


def test_count_reasons_caps_distinct_reasons():
    fails = [{"stage": "decode", "reason": f"r{i}"} for i in range(150)]
    by_stage, by_reason = count_reasons(fails)
    assert by_stage == {"decode": 150}
    assert len(by_reason) == 101 and sum(by_reason.values()) == 150


def test_output_lock_is_exclusive(tmp_path):
    with layout.OutputLock(tmp_path), pytest.raises(layout.OutputBusyError):
        with layout.OutputLock(tmp_path):
            pass
    with layout.OutputLock(tmp_path):
        pass
    assert os.path.exists(tmp_path / ".lock")

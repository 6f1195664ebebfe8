"""Commit protocol, recovery and planning without Ray or models (fast)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

import cnc.base.location as location
from cnc.base.errors import OutputBusyError
from pipelines.plan import PlanMismatchError, fingerprint, make_plan, prepare_plan
from triplets.config import BuildConfig
from triplets.sample import TripletSample, encode_sample
from triplets.shardio import BuildOutput, ShardStats, encode_tar, file_sha256, iter_samples, open_tar_writer, tar_keys

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
    output = BuildOutput(str(out))
    tmp = output.staging_path(shard)
    tmp.write_bytes(encode_tar([_sample(k, i) for i, k in enumerate(keys)]))
    failures = failures or []
    stats = ShardStats(shard=shard, name=f"{shard:06d}", fingerprint=FP, nitems=len(keys) + len(failures),
                       nsamples=len(keys), nfailed=len(failures))
    if crash_after is None:
        return output.commit_shard(shard, tmp, failures, stats)

    class Crash(Exception):
        pass

    calls = {"n": 0}
    real_replace = location.fsync_replace

    def replace(src, dst):
        if calls["n"] >= crash_after:
            raise Crash()
        calls["n"] += 1
        real_replace(src, dst)

    location.fsync_replace = replace
    try:
        with pytest.raises(Crash):
            output.commit_shard(shard, tmp, failures, stats)
    finally:
        location.fsync_replace = real_replace
    return None


def _recover(out, fp, sizes, verify=False):
    return BuildOutput(str(out)).recover(fp, sizes, verify)


def test_streamed_tar_is_byte_identical_to_encode_tar(tmp_path):
    samples = [_sample(f"k{i}", i) for i in range(3)]
    path = tmp_path / "a.tar"
    with open(path, "wb") as f:
        tw = open_tar_writer(f)
        for s in samples:
            tw.write(encode_sample(s))
        tw.close()
    assert path.read_bytes() == encode_tar(samples)
    assert tar_keys(str(path)) == ["k0", "k1", "k2"]

    # the shard sink streams the same bytes and hashes them while writing: the marker's sha256 is the tar's
    from pipelines.sink import ShardSink

    with ShardSink(BuildOutput(str(tmp_path / "out")), 0) as sink:
        for s in samples:
            sink.write(encode_sample(s))
        marker = sink.commit([], ShardStats(shard=0, name="000000", nsamples=3))
    published = tmp_path / "out" / "000000.tar"
    assert published.read_bytes() == encode_tar(samples)
    assert marker.sha256 == file_sha256(published) and marker.bytes == published.stat().st_size


def test_commit_then_recover_keeps_committed_shard(tmp_path):
    marker = _write_shard(tmp_path, 0, ["a", "b"], [{"key": "c", "source": "s", "stage": "decode", "reason": "x"}])
    assert marker.sha256 == file_sha256(tmp_path / "000000.tar")
    assert marker.url == "000000.tar" and marker.errors == "_cnc/errors/000000.jsonl"
    rows = [json.loads(line) for line in (tmp_path / "_cnc" / "errors" / "000000.jsonl").read_text().splitlines()]
    assert rows == [{"key": "c", "source": "s", "stage": "decode", "reason": "x"}]
    committed = _recover(tmp_path, FP, {0: 3})
    assert list(committed) == [0]
    assert [s.key for s in iter_samples(str(tmp_path / "000000.tar"))] == ["a", "b"]


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_crash_at_each_commit_step_leaves_nothing_committed(tmp_path, crash_after):
    _write_shard(tmp_path, 0, ["a"])
    _write_shard(tmp_path, 1, ["b", "c"], crash_after=crash_after)
    committed = _recover(tmp_path, FP, {0: 1, 1: 2})
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
                    (out / "_cnc" / "errors" / f"{shard:06d}.jsonl").unlink()
                else:
                    expected[shard] = keys
            else:
                _write_shard(out, shard, keys, crash_after=state)
        committed = _recover(out, FP, sizes, verify=True)
        for shard in range(4):
            tar = out / f"{shard:06d}.tar"
            if shard in committed:
                assert [s.key for s in iter_samples(str(tar))] == expected[shard]
            else:
                assert not tar.exists() and not (out / "_cnc" / f"{shard:06d}_stats.json").exists()
        assert set(committed) == set(expected)
        assert not list(out.rglob("*.tmp"))


def test_recover_rejects_marker_of_other_plan_or_size(tmp_path):
    _write_shard(tmp_path, 0, ["a"])
    assert _recover(tmp_path, "0" * 16, {0: 1}) == {}
    assert not (tmp_path / "000000.tar").exists()
    _write_shard(tmp_path, 1, ["a"])
    assert _recover(tmp_path, FP, {1: 2}) == {}  # plan says 2 items


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
    prepare_plan(BuildOutput(str(tmp_path)), p1)
    before = (tmp_path / "_cnc" / "plan.json").read_bytes()
    prepare_plan(BuildOutput(str(tmp_path)), make_plan(_items(5), _cfg(ray={"num_workers": 7}, device="cpu"), "/in", "folder"))
    assert (tmp_path / "_cnc" / "plan.json").read_bytes() == before  # operational keys do not matter


@pytest.mark.parametrize("change, message", [
    (dict(cfg=dict(seed=1)), "seed: 0 -> 1"),
    (dict(cfg=dict(samples_per_shard=3)), "samples_per_shard: 2 -> 3"),
    (dict(n=6), "had 5 items, now 6"),
    (dict(input="/other"), "another input"),
])
def test_plan_mismatch_is_refused_with_reason(tmp_path, change, message):
    prepare_plan(BuildOutput(str(tmp_path)), make_plan(_items(5), _cfg(), "/in", "folder"))
    cfg = BuildConfig(**({"samples_per_shard": 2} | change.get("cfg", {})))
    new = make_plan(_items(change.get("n", 5)), cfg, change.get("input", "/in"), "folder")
    with pytest.raises(PlanMismatchError, match=message.replace("(", r"\(")):
        prepare_plan(BuildOutput(str(tmp_path)), new)


def test_non_empty_folder_without_plan_is_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(PlanMismatchError, match="not empty"):
        prepare_plan(BuildOutput(str(tmp_path)), make_plan(_items(1), _cfg(), "/in", "folder"))
    assert (tmp_path / "holiday.jpg").exists()


def test_fingerprint_ignores_operational_keys_only():
    base = fingerprint(_cfg())
    assert fingerprint(_cfg(device="cuda", max_failure_fraction=0.5, ray={"num_workers": 3})) == base
    assert fingerprint(_cfg(batch_size=8)) != base
    assert fingerprint(_cfg(resolution=256)) != base


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


def test_output_lock_is_exclusive(tmp_path):
    out = BuildOutput(str(tmp_path))
    with out.lock(), pytest.raises(OutputBusyError):
        with out.lock():
            pass
    with out.lock():
        pass
    assert os.path.exists(tmp_path / ".lock")


def test_resume_checks_size_by_default_and_hashes_on_verify(tmp_path):
    """A same-size corruption passes the default (marker + size) check and is caught by verify."""
    _write_shard(tmp_path, 0, ["a", "b"])
    with open(tmp_path / "000000.tar", "r+b") as f:
        f.seek(700)
        f.write(b"X")
    assert list(_recover(tmp_path, FP, {0: 2})) == [0]
    assert _recover(tmp_path, FP, {0: 2}, verify=True) == {}
    _write_shard(tmp_path, 0, ["a", "b"])
    with open(tmp_path / "000000.tar", "r+b") as f:
        f.truncate(1024)
    assert _recover(tmp_path, FP, {0: 2}) == {}


def test_recovery_deletes_only_files_the_build_wrote(tmp_path):
    """Regression (issue 11.6): names that merely start with six digits are the user's, not ours."""
    _write_shard(tmp_path, 0, ["a"])
    theirs = [tmp_path / "123456_notes.txt", tmp_path / "_cnc" / "errors" / "424242_mine.txt",
              tmp_path / "000001.tar.bak", tmp_path / "000000.tar.tmp", tmp_path / "999999.jsonl",
              tmp_path / "_cnc" / "000009.tar", tmp_path / "errors" / "000003.jsonl"]
    (tmp_path / "errors").mkdir()
    for p in theirs:
        p.write_text("keep me")
    ours = [tmp_path / "000003.tar", tmp_path / "_cnc" / "errors" / "000003.jsonl",
            tmp_path / location.temp_name("000002.tar"),
            tmp_path / "_cnc" / "errors" / location.temp_name("000002.jsonl"),
            tmp_path / "_cnc" / "000003_stats.json", tmp_path / "_cnc" / location.temp_name("manifest.json")]
    for p in ours:
        p.write_text("partial")
    assert list(_recover(tmp_path, FP, {0: 1, 2: 1, 3: 1})) == [0]
    assert all(p.read_text() == "keep me" for p in theirs)
    assert not any(p.exists() for p in ours)


def test_legacy_layout_folder_stays_readable_and_resumable(tmp_path):
    """A folder built before sidecars moved to ``_cnc/`` (plan, markers and errors/ beside the tars) keeps its layout:
    recovery keeps its committed shards, new shards are committed the old way, readers find its markers."""
    from triplets.shardio import resolve_shards
    from triplets.shardio.names import LEGACY

    _write_shard(tmp_path, 0, ["a"])
    for name in ("000000_stats.json", "errors"):  # turn the folder into the legacy layout
        os.rename(tmp_path / "_cnc" / name, tmp_path / name)
    (tmp_path / "_cnc").rmdir()
    (tmp_path / "plan.json").write_text("{}")
    assert BuildOutput(str(tmp_path)).layout == LEGACY
    assert list(_recover(tmp_path, FP, {0: 1, 1: 1})) == [0]
    _write_shard(tmp_path, 1, ["b"])
    assert (tmp_path / "000001_stats.json").is_file() and (tmp_path / "errors" / "000001.jsonl").is_file()
    assert not (tmp_path / "_cnc").exists()
    assert list(_recover(tmp_path, FP, {0: 1, 1: 1})) == [0, 1]
    assert resolve_shards(str(tmp_path), committed_only=True) == [str(tmp_path / f"00000{i}.tar") for i in (0, 1)]
    assert BuildOutput(str(tmp_path)).file("plan.json").url == str(tmp_path / "plan.json")

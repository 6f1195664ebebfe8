"""The exactly-once commit (:mod:`triplets.shardio.output`) without Ray or models: commit, a crash at each step,
recovery, locks, resume checks, the legacy layout."""

from __future__ import annotations

import json
import os
import random

import pytest

import cnc.base.location as location
from cnc.base.errors import OutputBusyError
from tests.support import make_sample
from triplets.sample import TripletSample
from triplets.shardio import BuildOutput, ShardStats, encode_tar, file_sha256, iter_samples

FP = "f" * 16


def _sample(key: str, seed: int = 0, r: int = 16) -> TripletSample:
    return make_sample(key, seed, size=r, caption=f"caption {key}")


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

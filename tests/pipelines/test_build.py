"""`cnc build` on a real local Ray (127.0.0.1): outputs, fault tolerance, determinism, resume, exit codes.

One Ray for the whole file (``ray_local``); the driver-kill and fail-fast tests run ``cnc build``
in a subprocess. Tiny models at 64 px, shards of 3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnc.config import load_config
from pipelines.build import build_entry, run_build
from pipelines.plan import PlanMismatchError
from tests.support import (
    FAST_BUILD,
    REPO,
    TINY_CONFIG,
    assert_exactly_once,
    start_driver,
    synthetic_photo,
    write_jpeg,
)
from triplets.config import BuildConfig
from triplets.sample import FIELDS, validate_sample
from triplets.shardio import file_sha256, iter_samples, tar_keys

pytestmark = pytest.mark.ray
LENIENT = FAST_BUILD + ["max_failure_fraction=0.5"]


def _cfg(*extra: str) -> BuildConfig:
    return load_config(BuildConfig, TINY_CONFIG, LENIENT + list(extra))


def _shas(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.glob("*.tar"))}


def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name[:6].isdigit()}


@pytest.fixture(scope="module")
def reference(reference_build):
    return reference_build


def test_local_ray_listens_on_loopback_only(ray_local):
    psutil = pytest.importorskip("psutil")
    pids = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "Ray should have listening sockets"
    assert {c.laddr.ip for c in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_build_outputs_are_readable_by_every_reader(reference):
    out, result, _, photos = reference
    assert result.exit_code == 0
    assert (result.items_total, result.samples, result.failures, result.shards_committed) == (11, 8, 3, 4)
    assert_exactly_once(out, photos)
    tars = [str(p) for p in sorted(out.glob("*.tar"))]
    assert [Path(t).name for t in tars] == ["000000.tar", "000001.tar", "000002.tar", "000003.tar"]

    import webdataset as wds

    wds_samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert sorted(s["__key__"] for s in wds_samples) == sorted(photos["good"])
    assert all(set(FIELDS) <= set(s) for s in wds_samples)

    import ray

    ray_rows = ray.data.read_webdataset(tars).take_all()
    assert sorted(r["__key__"] for r in ray_rows) == sorted(photos["good"])
    folder_rows = ray.data.read_webdataset(str(out)).take_all()  # the folder itself: only shards at the top
    assert sorted(r["__key__"] for r in folder_rows) == sorted(photos["good"])
    card = (out / "_cnc" / "README.md").read_text()  # the dataset card, written with the manifest
    assert "samples: 8 in 4 shard(s)" in card and "failed: 3" in card and "`inpaint.model` | tiny" in card
    assert "*.tar" in (out / ".huggingface.yaml").read_text()

    decoded = [s for t in tars for s in iter_samples(t)]
    assert all(validate_sample(s) == [] for s in decoded)
    assert all(set(s.meta["quality"]) == {"version", "removal", "depth", "mask"} for s in decoded)
    assert {s.caption for s in decoded} == {f"a photo called {k}: test" for k in photos["good"]}

    rows = [json.loads(line) for f in sorted((out / "_cnc" / "errors").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    reasons = {r["key"]: (r["stage"], r["reason"]) for r in rows}
    assert set(reasons) == set(photos["bad"]) and all(set(r) >= {"key", "source", "stage", "reason"} for r in rows)
    assert reasons["img_001_empty"][0] == "decode" and reasons["img_001_empty"][1].startswith("empty file")
    assert reasons["img_004_text"][1].startswith("not an image")
    assert "truncated" in reasons["img_007_truncated"][1] or "corrupt" in reasons["img_007_truncated"][1]

    markers = [json.loads(p.read_text()) for p in sorted(out.glob("_cnc/*_stats.json"))]
    assert sum(m["nsamples"] for m in markers) == 8 and sum(m["nfailed"] for m in markers) == 3
    for m in markers:
        assert m["sha256"] == file_sha256(out / m["url"]) and m["bytes"] == (out / m["url"]).stat().st_size
        assert {"decode", "segment", "inpaint", "depth", "embed", "quality", "quality_stats", "encode", "write"} <= \
            set(m["stage_seconds"])
        assert {"pid", "host", "node_id", "device"} <= set(m["worker"])
    assert markers[0]["failures_by_stage"] == {"decode": 1} and markers[1]["nfailed"] == 0

    manifest = json.loads((out / "_cnc" / "manifest.json").read_text())
    assert manifest["__kind__"] == "wids-shard-index-v1" and manifest["name"] == "build"
    assert [s["url"] for s in manifest["shardlist"]] == [Path(t).name for t in tars]
    assert sum(s["nsamples"] for s in manifest["shardlist"]) == 8
    assert {"torch", "diffusers", "transformers", "ray", "webdataset", "cnc"} <= set(manifest["versions"])
    assert manifest["models"]["inpaint.model"]["id"] == "tiny"
    assert manifest["totals"]["failures"] == 3 and manifest["totals"]["shards_uncommitted"] == []
    assert load_config(BuildConfig, out / "_cnc" / "config.yaml") == _cfg()
    plan = json.loads((out / "_cnc" / "plan.json").read_text())
    assert [len(s["items"]) for s in plan["shards"]] == [3, 3, 3, 2]


def test_two_clean_builds_are_byte_identical(reference, tmp_path):
    out, _, src, _ = reference
    run_build(_cfg(), str(src), tmp_path / "again", progress=False)
    assert _shas(tmp_path / "again") == _shas(out)


def test_worker_killed_mid_shard_is_retried_without_loss(reference, tmp_path):
    out, _, src, photos = reference
    fault = {"kill_shard": 1, "kill_after_batches": 1}  # shard 1 = 2 batches; die after the first
    result = run_build(_cfg(), str(src), tmp_path / "faulty", progress=False, fault_injection=fault)
    assert result.exit_code == 0 and result.shards_lost == []
    marker = json.loads((tmp_path / "faulty" / "_cnc" / "000001_stats.json").read_text())
    assert marker["attempt"] >= 1  # retried (a restarting actor may cost one more attempt under load)
    assert_exactly_once(tmp_path / "faulty", photos)
    assert _shas(tmp_path / "faulty") == _shas(out)


def test_rerun_of_finished_build_does_no_work(reference):
    out, _, src, _ = reference
    before = _stats(out)
    result = run_build(_cfg(), str(src), out, progress=False)
    assert (result.shards_built, result.shards_skipped, result.exit_code) == (0, 4, 0)
    assert _stats(out) == before


def test_rerun_with_other_config_or_input_is_refused(reference, tmp_path, caplog):
    out, _, src, _ = reference
    before = _stats(out)
    with pytest.raises(PlanMismatchError, match="seed: 0 -> 1"):  # a UserError: the CLI exits 2 with this line
        build_entry(str(TINY_CONFIG), str(src), str(out), LENIENT + ["seed=1"], summary=False)
    write_jpeg(tmp_path / "other" / "one.jpg", synthetic_photo(5, 96, 96))
    with pytest.raises(PlanMismatchError, match="another input"):
        run_build(_cfg(), str(tmp_path / "other"), out, progress=False)
    assert _stats(out) == before


def test_retry_failed_recomputes_only_failures(reference, tmp_path):
    ref, _, src, photos = reference
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    before = _stats(out)
    result = run_build(_cfg(), str(src), out, retry_failed=True, progress=False)
    assert result.shards_built == 3 and result.failures == 3  # shards 0, 2, 3 had failures; they fail again
    after = _stats(out)
    assert after["000001.tar"] == before["000001.tar"]
    assert after["_cnc/000001_stats.json"] == before["_cnc/000001_stats.json"]
    assert after["000000.tar"] != before["000000.tar"]  # rewritten through the commit protocol...
    assert _shas(out) == _shas(ref)  # ...with the same bytes
    for shard in (0, 2, 3):
        m = json.loads((out / "_cnc" / f"{shard:06d}_stats.json").read_text())
        assert m["nreused"] == m["nsamples"] and m["nfailed"] == 1
    assert_exactly_once(out, photos)


def test_exit_code_follows_max_failure_fraction_and_retry_fixes(ray_local, tiny_photo_folder, tmp_path):
    src, photos = tiny_photo_folder  # 1 bad of 4 = 25 %
    out = tmp_path / "build"
    assert build_entry(str(TINY_CONFIG), str(src), str(out), FAST_BUILD, summary=False) == 1  # limit 5 %
    assert build_entry(str(TINY_CONFIG), str(src), str(out), FAST_BUILD + ["max_failure_fraction=0.3"],
                       summary=False) == 0
    (bad,) = photos["bad"]
    write_jpeg(src / f"{bad}.jpg", synthetic_photo(7))  # the source got fixed: --retry-failed picks it up
    cfg = load_config(BuildConfig, TINY_CONFIG, FAST_BUILD)
    result = run_build(cfg, str(src), out, retry_failed=True, progress=False)
    assert (result.samples, result.failures, result.exit_code, result.shards_built) == (4, 0, 0, 1)
    keys = [s.key for s in iter_samples(str(out / "000000.tar"))]
    assert keys == ["img_000", "img_001", bad]  # plan order, reused samples copied around the new one
    assert (out / "_cnc" / "errors" / "000000.jsonl").read_text() == ""


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_driver_sigkill_then_rerun_is_exactly_once(reference, tmp_path):
    ref, _, src, photos = reference
    out = tmp_path / "killed"
    env = dict(os.environ, CNC_TEST_FAULT_INJECTION=json.dumps({"batch_delay_s": 0.7}))
    env.pop("RAY_ADDRESS", None)  # a private local Ray for the driver we are going to kill
    cmd = [sys.executable, "-m", "cnc.cli", "build", "--config", str(TINY_CONFIG), "--input", str(src),
           "--output", str(out), "--no-progress"] + [a for o in LENIENT + ["ray.num_workers=1"] for a in ("--set", o)]
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    children = []
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("_cnc/*_stats.json")):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard committed in 120 s"
            children = _descendants(proc.pid) or children
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the driver only; its Ray dies with it
        proc.wait(30)
        # what a reader sees right after the crash: no temp file under a shard name, every .tar complete
        assert len(list(out.glob("_cnc/*_stats.json"))) < 4, "the build finished before the kill"
        for tar in out.glob("*.tar"):
            assert tar_keys(str(tar)) and list(iter_samples(str(tar)))
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in children:  # local Ray of the killed driver: agents may outlive it briefly
            try:
                child.wait(timeout=5)
            except Exception:  # noqa: BLE001
                try:
                    child.kill()
                except Exception:  # noqa: BLE001
                    pass
    result = run_build(_cfg(), str(src), out, progress=False)
    assert result.exit_code == 0 and result.shards_skipped >= 1
    assert_exactly_once(out, photos)
    assert _shas(out) == _shas(ref)


def test_missing_model_fails_fast_with_one_line(photo_folder, tmp_path):
    src, _ = photo_folder
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", "build", "--config", "configs/build/default.yaml",
                           "--input", str(src), "--output", str(tmp_path / "out")], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - t0 < 60
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines and all(line.startswith("error: ") for line in lines), proc.stderr  # one line per missing model
    assert "inpaint.model" in lines[0] and "stable-diffusion-v1-5/stable-diffusion-inpainting" in lines[0]
    assert any("segment.sam_checkpoint" in line for line in lines)
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_table_build_killed_driver_and_worker_is_exactly_once(ray_local, photo_table, tmp_path):
    """``cnc build`` on the table (joined to the session's Ray) is SIGKILLed after its first commit; the rerun loses
    a worker mid-shard; every item ends up committed exactly once."""
    root, photos = photo_table
    out = tmp_path / "out"
    env = dict(os.environ, CNC_TEST_FAULT_INJECTION=json.dumps({"batch_delay_s": 0.5}))
    cmd = [sys.executable, "-m", "cnc.cli", "build", "--config", str(TINY_CONFIG), "--input", str(root),
           "--output", str(out), "--no-progress", "--address", ray_local.get_runtime_context().gcs_address]
    cmd += [a for o in FAST_BUILD + ["max_failure_fraction=0.5", "ray.num_workers=1"] for a in ("--set", o)]
    proc = start_driver(cmd, tmp_path / "driver.log", lambda: bool(list(out.glob("_cnc/*_stats.json"))), cwd=REPO,
                        env=env, poll_s=0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert len(list(out.glob("_cnc/*_stats.json"))) < 4, "the build finished before the kill"
    fault = {"kill_shard": 3, "kill_after_batches": 1}  # the rerun's worker dies in shard 3's first attempt
    result = run_build(_cfg(), str(root), out, progress=False, fault_injection=fault)
    assert result.exit_code == 0 and result.shards_lost == [] and result.items_total == 11
    assert result.shards_skipped >= 1 and json.loads((out / "_cnc" / "000003_stats.json").read_text())["attempt"] >= 1
    assert_exactly_once(out, photos)
    manifest = json.loads((out / "_cnc" / "manifest.json").read_text())
    assert manifest["input_format"] == "table" and manifest["totals"]["shards_committed"] == 4
    again = run_build(_cfg(), str(root), out, progress=False)
    assert (again.shards_built, again.shards_skipped) == (0, 4)  # resume: markers only, no work

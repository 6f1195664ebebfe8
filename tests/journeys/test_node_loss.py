"""Losing a worker node mid-run, on a real multi-node Ray cluster on 127.0.0.1 (issue 26.1, issue 27.2).

One cluster for the module (:class:`tests.ray_cluster.LocalCluster`): a 0-CPU head, so every worker lands on a worker
node, and two 1-CPU worker nodes, each holding exactly one shard worker. Each test kills one worker node's whole
process group (raylet, agents, workers: a lost machine) while its work is in flight, then checks that the run
finished exactly once on the surviving node:

* ``cnc build --address`` to a local folder;
* ``cnc submit build`` (Jobs API; the driver runs on the head) to ``s3://`` on the moto server;
* ``cnc train --workers 1`` under Ray Train: the lost worker is restarted on the other node and resumes from the last
  checkpoint (Ray Train's ``FailureConfig``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.ray_cluster import LocalCluster
from tests.support import REPO, TINY_CONFIG, make_photo_folder, start_driver
from triplets.shardio import TarStream

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # make test-cluster
#: 12 images in 6 shards of 2 (one batch each); every batch sleeps 4 s, so a kill lands inside a shard.
N_IMAGES, SHARDS = 12, 6
BUILD_SETS = ["resolution=64", "min_side=32", "inpaint.num_inference_steps=2", "samples_per_shard=2", "batch_size=2",
              "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.progress_interval_s=1"]
SLOW = json.dumps({"batch_delay_s": 4.0})


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head (0 CPUs, Jobs API) + two 1-CPU worker nodes; started after the S3 server so every node reaches it."""
    c = LocalCluster(dashboard=True)
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def two_workers(cluster):
    """Two live worker nodes (a previous test killed one)."""
    return cluster.ensure_workers(2)


def _env(cluster: LocalCluster, **extra: str) -> dict:
    return {**cluster.env, "PYTHONPATH": str(REPO), **extra}


def _build_args(src: Path, out: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--input", str(src), "--output", out, *[a for o in BUILD_SETS
                                                                                  for a in ("--set", o)]]


def _check_exactly_once(tars: dict[str, bytes], markers: dict[str, dict], manifest: dict, keys: list[str]) -> None:
    """Every planned key in exactly one committed tar; markers and manifest agree with the tars' bytes."""
    import tempfile

    assert sorted(tars) == [f"{i:06d}.tar" for i in range(SHARDS)]
    seen: Counter = Counter()
    for name, data in tars.items():
        with tempfile.NamedTemporaryFile(suffix=".tar") as f:
            f.write(data)
            f.flush()
            seen.update(raw["__key__"] for raw in TarStream(f.name).samples())
        marker = markers[name.removesuffix(".tar")]
        assert marker["sha256"] == hashlib.sha256(data).hexdigest() and marker["bytes"] == len(data)
    assert seen == Counter(keys), seen  # each sample exactly once, none lost
    entries = {e["url"]: e for e in manifest["shardlist"]}
    assert sorted(entries) == sorted(tars)
    assert all(entries[n]["sha256"] == hashlib.sha256(d).hexdigest() for n, d in tars.items())
    assert manifest["totals"]["samples"] == N_IMAGES and manifest["totals"]["shards_uncommitted"] == []


def _retried_elsewhere(markers: dict[str, dict], lost_node: str) -> list[dict]:
    """Markers of shards committed on a retry (attempt >= 1); none of them on the lost node."""
    retried = [m for m in markers.values() if m["attempt"] >= 1]
    assert all(m["worker"]["node_id"] != lost_node for m in markers.values() if m in retried)
    return retried


def _kill_a_shard_worker_node(cluster: LocalCluster) -> str:
    """Kill a worker node that runs a shard worker (each node holds one); returns its Ray node id."""
    victim = cluster.node_running("ShardWorker")
    assert victim is not None, "no node runs a shard worker"
    cluster.kill_worker(victim)
    return victim.node_id


def test_build_survives_losing_a_worker_node(cluster, two_workers, tmp_path):
    src = tmp_path / "photos"
    keys = make_photo_folder(src, N_IMAGES, bad=())["good"]
    out = tmp_path / "build"
    meta = out / "_cnc"

    def markers() -> dict[str, dict]:
        found = {}
        for p in meta.glob("*_stats.json"):
            try:
                found[p.name.removesuffix("_stats.json")] = json.loads(p.read_text())
            except (OSError, ValueError):  # being written
                pass
        return found

    cmd = [sys.executable, "-m", "cnc.cli", "build", *_build_args(src, str(out)), "--address", cluster.address,
           "--no-progress"]
    t0 = time.monotonic()
    proc = start_driver(cmd, tmp_path / "driver.log", lambda: len(markers()) >= 1, cwd=tmp_path,
                        env=_env(cluster, CNC_TEST_FAULT_INJECTION=SLOW), timeout=400)
    lost = _kill_a_shard_worker_node(cluster)
    assert proc.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    log = (tmp_path / "driver.log").read_text()
    print(f"build with a lost node: {time.monotonic() - t0:.0f} s")  # noqa: T201 - reported duration
    assert "Traceback" not in log
    assert "retrying" in log  # the shard in flight on the lost node
    found = markers()
    assert _retried_elsewhere(found, lost), log[-3000:]
    _check_exactly_once({p.name: p.read_bytes() for p in out.glob("*.tar")}, found,
                        json.loads((meta / "manifest.json").read_text()), keys)
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or ".probe" in p.name]
    assert leftovers == []  # no partial object, no probe


def test_submitted_build_to_s3_survives_losing_a_worker_node(cluster, two_workers, s3_server, tmp_path):
    """`cnc submit build` (the driver runs as a Ray job on the head) writing to s3:// on the moto server."""
    import s3fs

    src = tmp_path / "photos"
    keys = make_photo_folder(src, N_IMAGES, bad=(), seed=50)["good"]
    out = s3_server.bucket("node-loss") + "/build"
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()

    def objects(suffix: str) -> dict[str, bytes]:
        found = {}
        fs.invalidate_cache()
        for p in fs.find(out.removeprefix("s3://") + "/"):
            if p.endswith(suffix):
                try:
                    found[p.split("/build/", 1)[1]] = fs.cat_file(p)
                except FileNotFoundError:  # replaced between the listing and the read
                    pass
        return found

    def markers() -> dict[str, dict]:
        return {n.removeprefix("_cnc/").removesuffix("_stats.json"): json.loads(b)
                for n, b in objects("_stats.json").items()}

    cmd = [sys.executable, "-m", "cnc.cli", "submit", "build", *_build_args(src, out), "--python", sys.executable,
           "--env", f"CNC_TEST_FAULT_INJECTION={SLOW}", "--address", cluster.jobs_url, "--wait"]
    t0 = time.monotonic()
    proc = start_driver(cmd, tmp_path / "submit.log", lambda: len(markers()) >= 1, cwd=tmp_path, env=_env(cluster),
                        timeout=400, poll_s=1.0)
    lost = _kill_a_shard_worker_node(cluster)
    assert proc.wait(timeout=400) == 0, (tmp_path / "submit.log").read_text()[-4000:]
    print(f"submitted S3 build with a lost node: {time.monotonic() - t0:.0f} s")  # noqa: T201 - reported duration
    log = (tmp_path / "submit.log").read_text()
    assert ": SUCCEEDED" in log and "Traceback" not in log, log[-3000:]
    found = markers()
    assert _retried_elsewhere(found, lost), log[-3000:]
    everything = objects("")
    assert not [n for n in everything if n.endswith(".tmp") or ".probe" in n]  # no partial object
    _check_exactly_once({n: b for n, b in everything.items() if n.endswith(".tar")}, found,
                        json.loads(everything["_cnc/manifest.json"]), keys)


def _train_args(shards: Path, out: Path) -> list[str]:
    sets = [f"data.train_shards={shards}", f"output_dir={out}", "train.max_train_steps=8",
            "train.checkpointing_steps=2", "train.checkpoints_total_limit=10", "validation.num_samples=0",
            "train.progress_bar=false", "train.report_to=none", "data.preflight_shards=0", "train.log_every=1"]
    return ["train", "--config", str(REPO / "configs" / "train" / "tiny.yaml"), *[a for o in sets for a in ("--set", o)]]


def test_ray_train_resumes_from_the_last_checkpoint_after_losing_its_node(cluster, two_workers, tiny_shards,
                                                                          tmp_path):
    """One Ray Train worker; its node dies after checkpoint-2: Ray Train restarts it on the other node, it resumes
    from the newest checkpoint and ends with the weights of an uninterrupted run (same seed, data order, RNG)."""
    from safetensors.torch import load_file

    out, straight = tmp_path / "ray", tmp_path / "straight"
    # the uninterrupted reference, in a plain process at the same time (1 torch thread, as a 1-CPU Ray worker)
    ref = subprocess.Popen([sys.executable, "-m", "cnc.cli", *_train_args(tiny_shards, straight)], cwd=tmp_path,
                           env=_env(cluster, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                           stderr=open(tmp_path / "straight.log", "w"))  # noqa: SIM115
    cmd = [sys.executable, "-m", "cnc.cli", *_train_args(tiny_shards, out), "--workers", "1", "--no-gpu",
           "--address", cluster.address]
    t0 = time.monotonic()
    proc = start_driver(cmd, tmp_path / "driver.log", lambda: (out / "checkpoint-2" / "trainer_state.json").is_file(),
                        cwd=tmp_path, env=_env(cluster, CNC_TEST_FAULT_INJECTION=json.dumps({"step_delay_s": 2.0})),
                        timeout=400)
    first = (out / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns
    victim = cluster.node_running("RayTrainWorker")
    assert victim is not None, "no node runs the Ray Train worker"
    cluster.kill_worker(victim)
    assert proc.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    print(f"Ray Train with a lost node: {time.monotonic() - t0:.0f} s")  # noqa: T201 - reported duration
    log = (tmp_path / "driver.log").read_text()
    assert "resuming from the last checkpoint of this run" in log and "resumed from" in log, log[-4000:]
    assert (out / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns == first  # not trained again from 0
    assert ref.wait(timeout=400) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8
    a = load_file(out / "local_fuser" / "diffusion_pytorch_model.safetensors")
    b = load_file(straight / "local_fuser" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)

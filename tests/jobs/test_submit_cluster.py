"""``cnc submit`` / ``cnc jobs`` against a real Ray head on 127.0.0.1 (token auth on, every port chosen here).

The head runs in its own process group (``start_new_session``); teardown signals that group only, so other Ray
instances on the machine are untouched (``ray stop`` would kill every Ray process of the user).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import REPO

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # make test-cluster

TINY = str(REPO / "configs" / "build" / "tiny.yaml")
RAY = str(Path(sys.executable).with_name("ray"))
FAST = ["--set", "resolution=64", "--set", "min_side=32", "--set", "inpaint.num_inference_steps=2",
        "--set", "samples_per_shard=2"]


@dataclass
class Cluster:
    address: str  # Jobs API URL
    env: dict[str, str]  # client environment (token auth)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pgid: int) -> None:
    """SIGTERM our head's process group, then SIGKILL whatever is left after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            return
        os.killpg(pgid, sig)
        deadline = time.monotonic() + grace
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="cnc-ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash, client, agent_grpc, agent_http, metrics, rt_agent, node_mgr, obj_mgr = _free_ports(9)
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep every Ray server on 127.0.0.1
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    args = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--dashboard-agent-listen-port={agent_http}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rt_agent}", f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}", f"--temp-dir={tmp}", "--disable-usage-stats"]
    with open(Path(tmp) / "ray-start.log", "w") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    try:
        if proc.wait(timeout=180) != 0:
            pytest.fail("ray start failed:\n" + (Path(tmp) / "ray-start.log").read_text()[-3000:])
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 120
        while True:  # the Jobs API answers a little after `ray start` returns
            try:
                req = urllib.request.Request(f"{url}/api/version", headers={"authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Ray Jobs API did not come up")
            time.sleep(1)
        yield Cluster(address=url, env=env)
    finally:
        _stop_group(proc.pid)
        shutil.rmtree(tmp, ignore_errors=True)


def cnc(cluster: Cluster, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m cnc.cli ARGS --address <cluster>`` in a subprocess (the cluster's token in its env)."""
    cmd = [sys.executable, "-m", "cnc.cli", *args, "--address", cluster.address]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          check=False)


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    for i in range(n):
        img = (rng.random((96, 96, 3)) * 60).astype(np.uint8)
        disc = (yy - 48) ** 2 + (xx - 40 - 4 * i) ** 2 < 24 ** 2
        img[disc] = (200, 80 + 40 * i, 60)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def _snapshot(out: Path) -> dict[str, tuple[str, int]]:
    """Shard tars and their markers: name -> (sha256, mtime_ns)."""
    files = sorted(out.glob("*.tar")) + sorted(out.glob("_cnc/*_stats.json"))
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def _submit_build(cluster: Cluster, images: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cnc(cluster, "submit", "build", "--config", TINY, *FAST, "--input", str(images), "--output", str(out),
               "--python", sys.executable, *extra)


def test_build_job_succeeds_and_resubmission_resumes(cluster, tmp_path):
    images, out = _images(tmp_path / "images"), tmp_path / "shards"
    first = _submit_build(cluster, images, out, "--wait")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    run_id = first.stdout.split("submitted ", 1)[1].split()[0]
    assert run_id.startswith("cnc-build-") and "(attempt 1)" in first.stdout
    assert f"{run_id}: SUCCEEDED" in first.stdout
    shards = _snapshot(out)
    assert len([n for n in shards if n.endswith(".tar")]) == 2 and len(shards) == 4  # 3 images, 2 per shard

    status = cnc(cluster, "jobs", "status", run_id)
    assert status.returncode == 0 and f"{run_id}: SUCCEEDED exit=0" in status.stdout

    again = _submit_build(cluster, images, out, "--wait")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"submitted {run_id}-r2 (attempt 2) (previous attempt SUCCEEDED)" in again.stdout
    assert _snapshot(out) == shards  # no shard rebuilt or rewritten

    listing = cnc(cluster, "jobs", "list")
    assert f"{run_id}\tSUCCEEDED\tbuild\tattempt=1\t{out}" in listing.stdout
    assert f"{run_id}-r2\tSUCCEEDED\tbuild\tattempt=2\t{out}" in listing.stdout


def test_failed_job_sets_exit_code_and_retry_is_a_new_attempt(cluster, tmp_path):
    args = ("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--entrypoint", "exit 3", "--wait")
    first = cnc(cluster, "submit", "build", "--config", TINY, *args)
    assert first.returncode == 3, first.stdout + first.stderr
    assert "(attempt 1)" in first.stdout and ": FAILED" in first.stdout
    second = cnc(cluster, "submit", "build", "--config", TINY, *args)
    assert second.returncode == 3 and "(attempt 2) (previous attempt FAILED)" in second.stdout


def test_running_job_is_attached_then_stopped(cluster, tmp_path):
    args = ("submit", "build", "--config", TINY, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--entrypoint", "echo started; sleep 300")
    first = cnc(cluster, *args)
    assert first.returncode == 0, first.stderr
    sid = first.stdout.split("submitted ", 1)[1].split()[0]
    second = cnc(cluster, *args)
    assert second.returncode == 0 and f"{sid} is already" in second.stdout and "attaching" in second.stdout

    stop = cnc(cluster, "jobs", "stop", sid)
    assert stop.returncode == 0, stop.stderr
    assert f"{sid}: STOPPED" in stop.stdout
    status = cnc(cluster, "jobs", "status", sid)
    assert f"{sid}: STOPPED" in status.stdout

    missing = cnc(cluster, "jobs", "status", "cnc-build-000000000000")
    assert missing.returncode == 2 and missing.stderr.startswith("error:")


def test_train_job_runs_ray_train_and_resubmission_resumes(cluster, tiny_shards, tmp_path):
    """`cnc submit train`: the trainer's Ray Train path on the cluster; attempt 2 resumes from the checkpoint."""
    out = tmp_path / "train"
    args = ("submit", "train", "--config", str(REPO / "configs" / "train" / "tiny.yaml"),
            "--set", "train.max_train_steps=4", "--set", "train.checkpointing_steps=2",
            "--input", str(tiny_shards), "--output", str(out), "--workers", "1", "--no-gpu",
            "--python", sys.executable, "--wait")
    first = cnc(cluster, *args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    assert (out / "local_fuser" / "diffusion_pytorch_model.safetensors").is_file()
    again = cnc(cluster, *args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "(attempt 2)" in again.stdout
    assert "checkpoint-4" in again.stdout + again.stderr  # resumed from the last checkpoint, no new steps
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_token_auth_is_detected_or_explained_in_one_line(cluster, tmp_path):
    """Issue 13.4: without RAY_AUTH_MODE=token, cnc uses the user's token where Ray keeps it, or says what to set."""
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(cluster.env["RAY_AUTH_TOKEN"])
    cmd = [sys.executable, "-m", "cnc.cli", "jobs", "list", "--address", cluster.address]
    ok = subprocess.run(cmd, env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "requires token authentication: using the token from" in ok.stderr
    empty = tmp_path / "nohome"
    empty.mkdir()
    bad = subprocess.run(cmd, env={**env, "HOME": str(empty)}, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "requires token authentication" in lines[0] and "~/.ray/auth_token" in lines[0]

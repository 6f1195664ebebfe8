"""The build driver under hostile conditions (regressions of issue 11): no hang, no orphans, clean signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines.scheduler import SchedulingError, check_placeable
from tests.support import FAST_BUILD, REPO, TINY_CONFIG

pytestmark = pytest.mark.ray


def _cmd(src, out, *extra):
    return [sys.executable, "-m", "cnc.cli", "build", "--config", str(TINY_CONFIG), "--input", str(src), "--output",
            str(out), "--no-progress", *[a for o in FAST_BUILD + ["max_failure_fraction=0.5", *extra]
                                         for a in ("--set", o)]]


def _env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def test_check_placeable_names_the_resource():
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 128.0}}]
    check_placeable(nodes, 2, 0)
    with pytest.raises(SchedulingError, match=r"needs 64 CPU.*ray.cpus_per_worker.*largest node has 2 CPU"):
        check_placeable(nodes, 64, 0)
    with pytest.raises(SchedulingError, match=r"1 GPU\(s\) \(ray.gpus_per_worker\)"):
        check_placeable(nodes, 1, 1)


def test_unschedulable_worker_fails_fast_instead_of_hanging(ray_local, photo_folder, tmp_path):
    src, _ = photo_folder
    address = ["--address", ray_local.get_runtime_context().gcs_address]  # a 2-CPU cluster, already running
    proc = subprocess.run(_cmd(src, tmp_path / "out", "ray.cpus_per_worker=64") + address, cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no Ray node can host a worker" in proc.stderr and "ray.cpus_per_worker" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigkill_of_the_driver_leaves_no_ray_process_behind(photo_folder, tmp_path):
    psutil = pytest.importorskip("psutil")
    src, _ = photo_folder
    out = tmp_path / "out"
    env = _env(CNC_TEST_FAULT_INJECTION=json.dumps({"batch_delay_s": 1.0}))
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(_cmd(src, out, "ray.num_workers=1"), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    family: dict[int, psutil.Process] = {}

    def cmdline(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # gone, or a zombie
            return ""

    try:
        deadline = time.monotonic() + 180
        while not any("ShardWorker" in cmdline(p) for p in family.values()):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no worker started in 180 s"
            try:
                family.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.2)
        family.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        ray_procs = [p for p in family.values() if p.is_running() and "reaper" not in cmdline(p)]
        _, alive = psutil.wait_procs(ray_procs, timeout=60)
        assert not alive, f"left running after the driver died: {[' '.join(p.cmdline())[:80] for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in family.values():
            try:
                p.kill()
            except psutil.Error:
                pass

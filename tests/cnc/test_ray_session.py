"""Joining a Ray cluster is bounded: an address where nothing (or no Ray GCS) answers is refused in one line
(issue 26.2). Ray's own client retries such an address for ever."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from cnc.ray_session import ClusterUnreachableError, connect_address
from tests.support import REPO, TINY_CONFIG


def _cnc_build(tmp_path, address: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "cnc.cli", "build", "--config", str(TINY_CONFIG), "--input", str(REPO / "examples"),
           "--output", str(tmp_path / "out"), "--address", address, "--set", "ray.connect_timeout_s=2"]
    # the timeout only guards the test against the old behaviour (a hang); the refusal takes seconds
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_cnc_build_refuses_an_address_where_nothing_listens(tmp_path):
    port = _free_port()
    proc = _cnc_build(tmp_path, f"127.0.0.1:{port}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = errors[0]
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port} within 2 s" in line
    assert f"127.0.0.1:{port}: Connection refused" in line  # what was tried
    assert "--node-ip-address=127.0.0.1" in line  # how to start a loopback cluster
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_port_that_accepts_but_is_no_ray_gcs_is_refused_in_one_line():
    """A listener that accepts and never speaks gRPC (Ray would wait on it for ever)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        with pytest.raises(ClusterUnreachableError, match="accepts connections but no Ray GCS answers there"):
            connect_address(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=1)
    finally:
        stop.set()
        thread.join()
        for c in conns:
            c.close()
        server.close()


@pytest.mark.parametrize("address", ["127.0.0.1", "http://127.0.0.1:8265", "127.0.0.1:port"])
def test_malformed_addresses_are_refused_in_one_line(address):
    with pytest.raises(ClusterUnreachableError, match="is not HOST:PORT"):
        connect_address(address, timeout_s=1)


def test_the_session_gcs_answers(ray_local):
    """The probe accepts a real Ray GCS (the session's local Ray)."""
    gcs = ray_local.get_runtime_context().gcs_address
    assert connect_address(gcs, timeout_s=10) in ({}, {"_node_ip_address": "127.0.0.1"})

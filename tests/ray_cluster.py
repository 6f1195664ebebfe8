"""A real multi-node Ray cluster on 127.0.0.1 for tests: one head, N worker nodes, each node its own process group.

Every node is started by a small launcher process (``python -m tests.ray_cluster head|worker ...``) in a new
session, so the node's raylet, GCS (head), agents and every worker process it spawns share that one session (Ray
gives each worker process its own process group, not its own session): killing a node is SIGKILL to every process
of the session at once — what losing a machine (spot preemption, a kernel panic) looks like to the rest of the
cluster. Teardown signals only our own sessions, never other Ray instances.

Token authentication is on, with a token of the cluster's own (in :attr:`LocalCluster.env`, which every driver of
a test uses; jobs inherit it from the head). All nodes stay on 127.0.0.1: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from rewriting the loopback address
to the machine's routable one (see :mod:`cnc.ray_session`), and every port is chosen here.
``ray start --address`` refuses to add a worker node in that mode, so the launcher starts the node the way
``ray.cluster_utils.Cluster.add_node`` does (``ray._private.node.Node``), but in its own process.

The head has 0 CPUs, so every task and actor lands on a worker node; node death is detected within ~3 s
(health checks every 500 ms, 4 misses).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Test-only GCS settings: detect a dead node in ~3 s instead of ~30 s.
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 4,
                 "health_check_initial_delay_ms": 0}
#: The environment of every node and of every driver joining the cluster.
CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _listened(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` (an IPv6 dual-stack listener included)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that nothing listens on (other Ray instances on the machine listen on
    v4-mapped IPv6 sockets, which an IPv4 ``bind(0)`` does not always see)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)  # held until all are chosen: no duplicates
            port = s.getsockname()[1]
            if not _listened(port):
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


# -- the launcher (runs in the node's own process) -------------------------------------------------------------
def _run_node(args: argparse.Namespace) -> None:
    os.environ.update(CLUSTER_ENV)
    import ray._private.node
    import ray._private.parameter

    head = args.role == "head"
    agent_grpc, agent_http, metrics, rt_agent, node_mgr, obj_mgr, client = free_ports(7)
    params = dict(node_ip_address="127.0.0.1", num_cpus=args.num_cpus, num_gpus=0, temp_dir=args.temp_dir,
                  object_store_memory=args.object_store_mb * 2**20, resources=json.loads(args.resources),
                  node_manager_port=node_mgr, object_manager_port=obj_mgr, min_worker_port=0, max_worker_port=0,
                  metrics_export_port=metrics, runtime_env_agent_port=rt_agent, dashboard_agent_listen_port=agent_http,
                  metrics_agent_port=agent_grpc)
    if head:
        params.update(gcs_server_port=args.port, include_dashboard=args.dashboard_port > 0,
                      dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port or None,
                      ray_client_server_port=client, _system_config=SYSTEM_CONFIG)
    else:
        params.update(gcs_address=args.address)  # its own log monitor: its own temp dir (see LocalCluster._start)
    node = ray._private.node.Node(ray._private.parameter.RayParams(**params), head=head, shutdown_at_exit=False,
                                  spawn_reaper=False)

    def _stop(signum, frame):  # noqa: ARG001
        node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, _stop)
    if head:  # what `ray start --head` records: the Jobs API resolves its drivers' RAY_ADDRESS ("auto") from it; without
        # it Ray looks for *any* GCS process on the machine and may hand a job another user's cluster
        import ray._private.utils

        ray._private.utils.write_ray_address(node.gcs_address, args.temp_dir)
    else:  # registered with the GCS and its object store up, as ray.cluster_utils.Cluster waits for
        import ray._private.services

        ray._private.services.wait_for_node(node.gcs_address, node.plasma_store_socket_name, 120)
    Path(args.ready).write_text(json.dumps({"node_id": node.node_id, "gcs_address": node.gcs_address,
                                            "pid": os.getpid()}))
    while True:
        signal.pause()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=["head", "worker"])
    p.add_argument("--temp-dir", required=True)
    p.add_argument("--ready", required=True, help="file written (JSON) once the node is up")
    p.add_argument("--port", type=int, default=0, help="head: GCS port")
    p.add_argument("--dashboard-port", type=int, default=0, help="head: Jobs API port (0 = no dashboard)")
    p.add_argument("--address", help="worker: GCS address of the head")
    p.add_argument("--num-cpus", type=int, default=1)
    p.add_argument("--object-store-mb", type=int, default=100)
    p.add_argument("--resources", default="{}", help="custom resources as JSON")
    _run_node(p.parse_args(argv))


# -- the test side ----------------------------------------------------------------------------------------------
def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (a node: its launcher leads the session; Ray puts each worker process
    in a process group of its own, but they stay in the session)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return pids


def _signal_session(sid: int, sig: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_session(sid: int, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """``sig`` to every process of session ``sid``, then SIGKILL whatever is left after ``grace`` seconds."""
    for s, g in ((sig, grace), (signal.SIGKILL, 10.0)):
        if not session_pids(sid):
            return
        _signal_session(sid, s)
        deadline = time.monotonic() + g
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.1)


@dataclass
class NodeProcess:
    """One node: its launcher's process (the leader of the node's session: ``pgid`` = session id) and Ray node id."""

    proc: subprocess.Popen
    node_id: str
    resources: dict = field(default_factory=dict)

    @property
    def pgid(self) -> int:
        return self.proc.pid


class LocalCluster:
    """A head (0 CPUs) + worker nodes on 127.0.0.1 (see the module docstring).

    Args:
        dashboard: start the head's dashboard (the Jobs API that ``cnc submit`` uses).
        timeout: seconds a node may take to start.
    """

    def __init__(self, dashboard: bool = False, timeout: float = 180.0):
        self.tmp = tempfile.mkdtemp(prefix="cnc-rc-", dir="/tmp")  # short: Ray's unix sockets live under it
        self.timeout = timeout
        import secrets

        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        # token auth with a token of this cluster's own: never the user's ~/.ray/auth_token, which any other Ray on
        # the machine may (re)generate while the tests run
        self.env.update(CLUSTER_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        self.port, self.dashboard_port = free_ports(2)
        if not dashboard:
            self.dashboard_port = 0
        self.workers: list[NodeProcess] = []
        self.head = self._start("head", "--port", str(self.port), "--num-cpus", "0",
                                "--dashboard-port", str(self.dashboard_port))
        self.address = f"127.0.0.1:{self.port}"

    @property
    def jobs_url(self) -> str:
        """The Jobs API (``cnc submit --address``); only with ``dashboard=True``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, role: str, *args: str) -> NodeProcess:
        ready = Path(self.tmp) / f"{role}-{len(self.workers)}-{time.monotonic_ns()}.json"
        log = open(Path(self.tmp) / f"{ready.stem}.log", "w")  # noqa: SIM115 - owned by the process
        # a temp folder per node, as on separate machines: nodes sharing one would also share the session's
        # runtime_resources/ (job working_dir packages), and one node's runtime-env agent replaces files another
        # node's processes are importing
        temp = self.tmp if role == "head" else tempfile.mkdtemp(prefix="w", dir=self.tmp)
        proc = subprocess.Popen([sys.executable, "-m", "tests.ray_cluster", role, "--temp-dir", temp,
                                 "--ready", str(ready), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=Path(__file__).resolve().parents[1])
        log.close()
        deadline = time.monotonic() + self.timeout
        while not ready.is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop_session(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"Ray {role} node did not start:\n"
                                   + Path(self.tmp, f"{ready.stem}.log").read_text()[-3000:])
            time.sleep(0.2)
        time.sleep(0.1)  # the file is complete: written in one call before the launcher pauses
        return NodeProcess(proc, json.loads(ready.read_text())["node_id"])

    def add_worker(self, num_cpus: int = 1, resources: dict | None = None) -> NodeProcess:
        """Start a worker node; returns once the head lists it alive."""
        node = self._start("worker", "--address", self.address, "--num-cpus", str(num_cpus),
                           "--resources", json.dumps(resources or {}))
        node.resources = {"CPU": num_cpus, **(resources or {})}
        self.workers.append(node)
        return node

    def alive_workers(self) -> list[NodeProcess]:
        return [w for w in self.workers if w.proc.poll() is None]

    def ensure_workers(self, n: int, num_cpus: int = 1) -> list[NodeProcess]:
        """Top the cluster up to ``n`` live worker nodes (after a test killed some)."""
        self.workers = self.alive_workers()
        while len(self.workers) < n:
            self.add_worker(num_cpus)
        return self.workers

    def node_running(self, title: str) -> NodeProcess | None:
        """The live worker node one of whose processes has ``title`` in its command line (Ray names its worker
        processes after the actor: ``ray::ShardWorker``, ``ray::RayTrainWorker``), or ``None``."""
        import psutil

        sessions = {w.pgid: w for w in self.alive_workers()}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if title in " ".join(p.info["cmdline"] or []) and os.getsid(p.pid) in sessions:
                    return sessions[os.getsid(p.pid)]
            except (ProcessLookupError, psutil.Error):
                continue
        return None

    def kill_worker(self, node: NodeProcess) -> None:
        """SIGKILL every process of the node at once (raylet, agents, worker processes): a lost machine."""
        _signal_session(node.pgid, signal.SIGKILL)
        node.proc.wait(timeout=30)
        _stop_session(node.pgid, signal.SIGKILL)  # anything that was being forked at that moment
        self.workers = [w for w in self.workers if w is not node]

    def shutdown(self) -> None:
        """Stop every node we started (workers first), then remove the temp folder."""
        import shutil

        for node in [*self.workers, self.head]:
            _stop_session(node.pgid)
        self.workers = []
        shutil.rmtree(self.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

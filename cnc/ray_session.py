"""The one Ray session of the project (the shard builder and Ray Train both use it).

:func:`ray_session` joins a cluster (``address``, else ``$RAY_ADDRESS`` as ``ray job submit`` sets it) or starts a
private local Ray bound to 127.0.0.1 only, without a dashboard. For a local Ray it also starts a *reaper*: a small
process in its own session that waits for the driver to exit — however it exits, ``kill -9`` included — and then
kills every process of that Ray session (raylet, GCS, the dashboard and runtime-env agents, workers), so nothing is
left orphaned.

Joining a cluster is bounded (:func:`connect_address`): before ``ray.init`` the address is probed over TCP for
``connect_timeout_s``; an address where nothing answers is refused in one line naming it and what was tried (Ray
itself retries for ever). A loopback address (``127.0.0.1:PORT``) is joined as it is when the cluster listens only
there (Ray would otherwise rewrite it to the machine's routable address and never reach it).

While the session is open, SIGTERM is handled like SIGINT (Ray's own handler would dump and exit 1): it raises
:class:`Interrupted` in the main thread, which the builder turns into a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from cnc.base.errors import UserError

log = logging.getLogger(__name__)
#: Seconds to wait for a cluster address to accept a connection (``cnc build`` reads ``ray.connect_timeout_s``).
DEFAULT_CONNECT_TIMEOUT_S = 60.0
LOOPBACK_HINT = ("for a cluster on this machine only, start its head with "
                 "`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address=127.0.0.1 --port=PORT`")


class ClusterUnreachableError(UserError):
    """Nothing answers at the Ray address the user gave."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def init_local_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Start a private local Ray bound to 127.0.0.1 only (no dashboard), with a reaper.

    ``_node_ip_address="127.0.0.1"`` alone is not enough on Linux: Ray "resolves" a loopback node address to the
    machine's routable IP and its gRPC servers listen on every interface. Ray's (private) ``ENABLE_RAY_CLUSTER``
    switch off makes it treat the node as local-only, as on macOS/Windows: the node IP stays 127.0.0.1 and every
    server binds to it (a test checks every listening socket).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # the env var is read at import; ray may be imported already
    ray.init(address="local", num_cpus=num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False,
             _node_ip_address="127.0.0.1", **kwargs)
    start_reaper()


def start_reaper() -> subprocess.Popen | None:
    """Start the reaper of the current local Ray session (see the module docstring)."""
    try:
        from ray._private import worker

        session_dir = worker._global_node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - not a local node we started: nothing to reap
        return None
    return subprocess.Popen([sys.executable, "-m", "cnc.reaper", str(os.getpid()), session_dir],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):  # noqa: ARG001 - signal handler signature
        raise Interrupted(signum)

    old = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``; ``None`` for ``auto``/``local``."""
    if address in ("auto", "local"):
        return None
    scheme, has_scheme, rest = address.partition("://")
    if not has_scheme:
        rest = address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if (has_scheme and scheme != "ray") or not sep or not port.isdigit() or not host:
        raise ClusterUnreachableError(
            f"Ray address {address!r} is not HOST:PORT (the GCS port of `ray start --head`, 6379 by default), "
            f"ray://HOST:PORT or 'auto'")
    return host.strip("[]"), int(port)


def _answers(host: str, port: int, timeout: float) -> str | None:
    """``None`` when ``host:port`` accepts a TCP connection within ``timeout`` s, else why not."""
    try:
        with socket.create_connection((host, port), timeout=max(0.1, timeout)):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _routable_ip() -> str | None:
    """The address Ray uses instead of a loopback one (its "node IP from perspective"), or ``None``."""
    try:
        from ray._private.services import node_ip_address_from_perspective

        ip = node_ip_address_from_perspective()
    except Exception:  # noqa: BLE001 - no routable interface: only loopback is possible
        return None
    return None if ip.startswith("127.") or ip == "::1" else ip


def connect_address(address: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> dict:
    """Probe ``address`` over TCP until it answers or ``timeout_s`` passes; return extra ``ray.init`` arguments.

    A loopback ``HOST`` stays loopback (``_node_ip_address=127.0.0.1``, Ray's cluster mode off for this process)
    when the cluster listens there but not on the routable address Ray would rewrite it to.

    Raises:
        ClusterUnreachableError: nothing answered; the one line names the address, what was tried and the hint for
            loopback clusters.
    """
    hp = _host_port(address)
    if hp is None:
        return {}
    host, port = hp
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    routable = _routable_ip() if loopback and not address.startswith("ray://") else None
    targets = [(host, port)] + ([(routable, port)] if routable else [])
    deadline = time.monotonic() + timeout_s
    while True:
        why = {f"{h}:{p}": _answers(h, p, min(5.0, max(0.1, deadline - time.monotonic()))) for h, p in targets}
        found = next((t for t in reversed(targets) if why[f"{t[0]}:{t[1]}"] is None), None)
        if found is not None:
            if not address.startswith("ray://"):
                _check_gcs(address, *found, max(5.0, deadline - time.monotonic()))
            if found[0] != host or routable is None:
                return {}  # Ray's own rewrite of a loopback address reaches this cluster
            _stay_on_loopback()
            return {"_node_ip_address": "127.0.0.1"}
        if time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    tried = "; ".join(f"{t}: {w}" for t, w in why.items())
    raise ClusterUnreachableError(
        f"cannot reach the Ray cluster at {address} within {timeout_s:g} s (tried {tried}); is its head running "
        f"(`ray start --head --port={port}`)? {LOOPBACK_HINT}")


def _check_gcs(address: str, host: str, port: int, timeout: float) -> None:
    """Raise :class:`ClusterUnreachableError` unless a Ray GCS answers a gRPC call at ``host:port`` within
    ``timeout`` s (Ray's own client would wait for ever on a port that accepts connections but is not a GCS).
    Skipped with TLS (``RAY_USE_TLS``) or without Ray's generated stubs."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    try:
        import grpc  # lazy: optional (ships with Ray), only to probe a GCS address
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
            return
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return  # a GCS with token auth: Ray's client brings the token
            detail = (exc.details() or "").splitlines()[0][:160]
    raise ClusterUnreachableError(
        f"{host}:{port} accepts connections but no Ray GCS answers there within {timeout:.0f} s ({code.name}: "
        f"{detail}); --address {address} must be the GCS port of the head (`ray start --head --port=...`, 6379 by "
        f"default), not the dashboard/Jobs API (that one is for `cnc submit --address`)")


def _stay_on_loopback() -> None:
    """Keep this driver's Ray on 127.0.0.1 (see :func:`init_local_ray`)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def ray_session(address: str | None = None, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                **init_kwargs) -> Iterator[None]:
    """Use the current Ray connection, or join ``address`` (``auto`` | ``HOST:PORT`` | ``ray://...``; default
    ``$RAY_ADDRESS``), or start a private local Ray on 127.0.0.1. Shuts down what it started.

    Raises:
        ClusterUnreachableError: nothing answers at the address within ``connect_timeout_s`` (one line).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        extra = connect_address(address, connect_timeout_s)
        ray.init(address=address, **extra, **init_kwargs)
    else:
        init_local_ray(**init_kwargs)
    try:
        yield
    finally:
        ray.shutdown()

"""The one Ray session of the project (the shard builder and Ray Train both use it).

:func:`ray_session` joins a cluster (``address``, else ``$RAY_ADDRESS`` as ``ray job submit`` sets it) or starts a
private local Ray bound to 127.0.0.1 only, without a dashboard. For a local Ray it also starts a *reaper*: a small
process in its own session that waits for the driver to exit — however it exits, ``kill -9`` included — and then
kills every process of that Ray session (raylet, GCS, the dashboard and runtime-env agents, workers), so nothing is
left orphaned.

While the session is open, SIGTERM is handled like SIGINT (Ray's own handler would dump and exit 1): it raises
:class:`Interrupted` in the main thread, which the builder turns into a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)


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
    import threading

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


@contextlib.contextmanager
def ray_session(address: str | None = None, **init_kwargs) -> Iterator[None]:
    """Use the current Ray connection, or join ``address`` (``auto`` | ``HOST:PORT`` | ``ray://...``; default
    ``$RAY_ADDRESS``), or start a private local Ray on 127.0.0.1. Shuts down what it started."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, **init_kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**init_kwargs)  # Ray resolves $RAY_ADDRESS itself
    else:
        init_local_ray(**init_kwargs)
    try:
        yield
    finally:
        ray.shutdown()

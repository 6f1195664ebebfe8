"""``python -m cnc.reaper DRIVER_PID SESSION_DIR``: kill a local Ray session's processes once its driver is gone.

Started by :func:`cnc.ray_session.start_reaper` in a new process session, so it outlives a ``kill -9`` of the
driver. While the driver lives it keeps a record of the driver's process tree (every second: pid and start time of
each descendant — Ray's raylet, GCS, dashboard and runtime-env agents, workers). When the driver has exited it sends
SIGKILL to every recorded process that still runs with the same start time (so a reused pid is never hit), and to
any process whose command line names the session folder, then exits. It never touches other processes.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _stat(pid: int) -> tuple[int, int, str] | None:
    """``(parent pid, start time in clock ticks, state)`` of ``pid`` from ``/proc``, or ``None``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(root: int) -> dict[int, int]:
    """pid → start time of every process below ``root``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[1]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out[child] = starts[child]
                todo.append(child)
    return out


def session_pids(session_dir: str) -> list[int]:
    """Pids of the processes whose command line mentions ``session_dir`` (or its name), this one excluded."""
    name = os.path.basename(session_dir.rstrip("/"))
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if session_dir in cmd or (name and name in cmd):
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] != "Z"  # a zombie has exited (its parent has not reaped it yet)


def main(argv: list[str]) -> int:
    driver, session_dir = int(argv[0]), argv[1]
    me = os.getpid()
    seen: dict[int, int] = {}
    while _alive(driver):
        seen.update(descendants(driver))
        seen.pop(me, None)
        time.sleep(1.0)
    time.sleep(1.0)  # a clean ray.shutdown() needs a moment; whatever is left after it is orphaned
    targets = {pid for pid, start in seen.items() if (st := _stat(pid)) is not None and st[1] == start}
    targets |= set(session_pids(session_dir))
    targets.discard(me)
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

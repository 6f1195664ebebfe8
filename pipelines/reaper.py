"""``python -m pipelines.reaper DRIVER_PID SESSION_DIR``: kill a local Ray session's processes once its driver is gone.

Started by :func:`pipelines.ray_session.start_reaper` in a new process session, so it outlives a ``kill -9`` of the
driver. It polls the driver's pid; when the driver has exited it sends SIGKILL to every process whose command line
names the session folder (every Ray process of that session does) and exits. It never touches other processes.
"""

from __future__ import annotations

import os
import signal
import sys
import time


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    driver, session_dir = int(argv[0]), argv[1]
    while _alive(driver):
        time.sleep(0.5)
    time.sleep(1.0)  # a clean ray.shutdown() needs a moment; whatever is left after it is orphaned
    for pid in session_pids(session_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

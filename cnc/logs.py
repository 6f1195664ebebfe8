"""Logging set-up shared by every command (rich handler on a terminal, plain otherwise)."""

from __future__ import annotations

import logging
import sys


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap and close streams)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once; later calls only change the level."""
    root = logging.getLogger()
    if getattr(root, "_cnc_configured", False):
        root.setLevel(level)
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib", "fsspec", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root._cnc_configured = True  # type: ignore[attr-defined]

"""Logging set-up shared by every command (rich handler on a terminal, plain otherwise)."""

from __future__ import annotations

import logging
import os
import sys


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap and close streams)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


#: Third-party messages that are not the user's business at WARNING: (logger, substring, level). Filters sit on the
#: emitting logger itself (a logger-level filter sees every record it creates, whatever handler prints it), so no
#: library is imported here.
DEMOTED: tuple[tuple[str, str, int], ...] = (
    # the private Ray of a build/test listens on 127.0.0.1 only; remote clusters are never started by cnc
    ("ray._private.authentication.authentication_token_setup", "Token authentication is disabled", logging.DEBUG),
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled", logging.DEBUG),
    # library-internal deprecations (diffusers passes torch_dtype to transformers)
    ("transformers.modeling_utils", "`torch_dtype` is deprecated", logging.DEBUG),
    ("transformers.configuration_utils", "`torch_dtype` is deprecated", logging.DEBUG),
    ("diffusers.pipelines.pipeline_utils", "torch_dtype", logging.DEBUG),
    ("diffusers.models.modeling_utils", "torch_dtype", logging.DEBUG),
    ("py.warnings", "torch_dtype", logging.DEBUG),
)


class _Demote(logging.Filter):
    """Re-level matching records; drop them when the new level is below what the root logger shows."""

    def __init__(self, rules: list[tuple[str, int]]):
        super().__init__()
        self.rules = rules

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for text, level in self.rules:
            if text in msg and record.levelno > level:
                record.levelno, record.levelname = level, logging.getLevelName(level)
                return level >= logging.getLogger().getEffectiveLevel()
        return True


def route_third_party() -> None:
    """Send Python warnings to the log (``py.warnings``) and demote the :data:`DEMOTED` messages."""
    logging.captureWarnings(True)
    rules: dict[str, list[tuple[str, int]]] = {}
    for name, text, level in DEMOTED:
        rules.setdefault(name, []).append((text, level))
    for name, r in rules.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Demote) for f in logger.filters):
            logger.addFilter(_Demote(r))


def progress_bars_enabled() -> bool:
    """Whether progress bars may be drawn: only on a terminal (bars go to stderr), and not after
    :func:`quiet_library_progress` switched them off (``TQDM_DISABLE``)."""

    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0", "false", "False")


def quiet_library_progress(force: bool = False) -> None:
    """The one switch for library progress bars, called by every command (:func:`cnc.cli._root`) and by Ray workers:
    off a terminal (stderr piped into a job log, CI, ``2> log``) no tqdm bar from diffusers, transformers,
    huggingface_hub or tqdm itself — their carriage returns turn a log into one long line. Progress is then logged
    as lines (:class:`cnc.progress.StepProgress`).

    Environment variables reach libraries imported later and child processes (Ray workers, ``accelerate launch``):
    ``TQDM_DISABLE`` (every tqdm bar that does not pass ``disable`` itself), ``HF_HUB_DISABLE_PROGRESS_BARS``
    (hub downloads; transformers reads it on import). Libraries already imported are switched off directly, and
    pipelines that pass ``disable`` themselves ask :func:`progress_bars_enabled` (``CnCPipeline.progress_bar``).
    No library is imported here (``cnc --help`` stays fast).
    """

    if sys.stderr.isatty() and not force:
        return
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        try:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        except Exception:  # noqa: BLE001 - an API that moved: the environment variable still holds
            pass
    for name in ("diffusers", "transformers"):
        module = sys.modules.get(f"{name}.utils.logging")
        if module is not None:
            try:
                module.disable_progress_bar()
            except Exception:  # noqa: BLE001 - an optional library or an API that moved: bars stay, nothing breaks
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
    route_third_party()
    root._cnc_configured = True  # type: ignore[attr-defined]

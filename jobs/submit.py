"""Submit a :class:`~jobs.run.RunSpec` through the Ray Jobs API, resuming instead of duplicating.

Submission ids (Ray refuses to reuse one):

* attempt 1 of a run is submitted as the run id itself, ``cnc-build-<sha12>``;
* attempt *n* ≥ 2 is ``cnc-build-<sha12>-r<n>``.

Before submitting, the latest attempt of the run on the cluster is looked up. PENDING/RUNNING → attach to it (no new
job). FAILED/STOPPED/SUCCEEDED → submit attempt n + 1; the builder then resumes from its committed shards (a
finished build does no work). Nothing is deleted on the cluster.

What is shipped (``runtime_env``): ``working_dir`` is a fresh staging folder holding the project packages
(:data:`SHIP_PACKAGES`, copied from where they are imported, without :data:`EXCLUDES`) and ``.cnc_job/config.yaml``,
the resolved config; the job's cwd is that folder, so ``python -m cnc.cli`` imports the submitted code, and Ray's
workers get the same folder. ``env_vars`` holds only :data:`DEFAULT_ENV` plus what the caller passes explicitly, and
names that look like credentials are refused: put secrets on the cluster, never in a submission.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cnc.base.errors import UserError
from cnc.config import ConfigError
from jobs.run import RunSpec

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SHIP_PACKAGES = ("cnc", "triplets", "pipelines", "cnc_model", "jobs")
EXCLUDES = ("__pycache__", "*.pyc", ".venv", ".git", "out", "runs", "*.tar", "*.egg-info", ".pytest_cache")
JOB_DIR = ".cnc_job"
CONFIG_IN_JOB = f"{JOB_DIR}/config.yaml"
DEFAULT_ENV = {"PYTHONUNBUFFERED": "1"}
SECRET_PATTERN = re.compile(r"(TOKEN|SECRET|PASSW|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE)|^AWS_|^GOOGLE_APPLICATION",
                            re.IGNORECASE)
ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_ATTEMPT = re.compile(r"^(?P<base>.+?)(?:-r(?P<n>\d+))?$")


def resolve_address(address: str | None) -> str:
    """``--address`` → Jobs API URL: explicit value, else ``$RAY_ADDRESS``, else the loopback dashboard.

    A bare ``host:port`` gets ``http://``; ``auto`` and URLs pass through.
    """
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if address != "auto" and "://" not in address:
        address = f"http://{address}"
    return address


def check_env(env: dict[str, str]) -> dict[str, str]:
    """Refuse env vars whose names look like credentials; returns ``env`` unchanged otherwise."""
    bad = sorted(k for k in env if SECRET_PATTERN.search(k))
    if bad:
        raise ConfigError(f"refusing to ship credential-like env vars {bad} in a job submission; set them on the "
                          "cluster nodes (or a Kubernetes secret: cnc render-job k8s --secret NAME)")
    return env


def attempt_id(run_id: str, attempt: int) -> str:
    """Submission id of ``attempt`` (1-based) of ``run_id``."""
    return run_id if attempt == 1 else f"{run_id}-r{attempt}"


def parse_attempt(submission_id: str) -> tuple[str, int]:
    """Inverse of :func:`attempt_id`: ``cnc-build-abc-r3`` → ``("cnc-build-abc", 3)``."""
    m = _ATTEMPT.match(submission_id)
    assert m is not None  # the pattern matches any non-empty string
    return m["base"], int(m["n"] or 1)


@dataclass
class JobRequest:
    """Everything :func:`submit` sends, except the staged ``working_dir`` (see :func:`staged_working_dir`)."""

    run_id: str
    entrypoint: str
    config_yaml: str
    env_vars: dict[str, str]
    metadata: dict[str, str]
    ship_code: bool = True
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_resources: dict[str, float] | None = None
    files: list[str] = field(default_factory=list)

    def runtime_env(self, working_dir: str) -> dict:
        """The ``runtime_env`` for a staged ``working_dir``."""
        return {"working_dir": working_dir, "env_vars": dict(self.env_vars)}

    def describe(self) -> dict:
        """JSON-safe summary for ``--dry-run`` (the working_dir is shown as the list of files it would hold)."""
        out = {
            "submission_id": attempt_id(self.run_id, 1),
            "run_id": self.run_id,
            "id_scheme": f"{self.run_id} for attempt 1, {self.run_id}-r<N> for attempt N; a PENDING/RUNNING "
                         "attempt is attached to instead of resubmitted",
            "entrypoint": self.entrypoint,
            "runtime_env": self.runtime_env(f"<staging folder: {', '.join(self.files)}>"),
            "metadata": self.metadata,
            "resolved_config": self.config_yaml,
        }
        for key in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_resources"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def build_request(spec: RunSpec, *, python: str = "python", env: dict[str, str] | None = None,
                  ship_code: bool = True, entrypoint_template: str | None = None,
                  entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
                  entrypoint_resources: dict[str, float] | None = None) -> JobRequest:
    """Turn a run into a job request: entrypoint joins the job's cluster (``--address auto``).

    ``entrypoint_num_gpus`` defaults to 0 for builds and Ray Train runs (their actors request GPUs themselves) and to
    1 for a single-process GPU ``train`` (``workers == 0``) when not given, so that driver lands on a GPU node.
    """
    if entrypoint_num_gpus is None and spec.kind == "train" and spec.workers == 0 and spec.gpu:
        entrypoint_num_gpus = 1
    entrypoint = spec.command(config_path=CONFIG_IN_JOB, address="auto", python=python, template=entrypoint_template)
    metadata = {"cnc_run": spec.run_id, "cnc_kind": spec.kind, "cnc_config_hash": spec.config_hash,
                "cnc_output": spec.output or "", "cnc_input": spec.input or ""}
    files = [f"{p}/" for p in SHIP_PACKAGES] if ship_code else []
    return JobRequest(run_id=spec.run_id, entrypoint=entrypoint, config_yaml=spec.config_yaml(),
                      env_vars={**DEFAULT_ENV, **check_env(dict(env or {}))}, metadata=metadata,
                      ship_code=ship_code, entrypoint_num_cpus=entrypoint_num_cpus,
                      entrypoint_num_gpus=entrypoint_num_gpus, entrypoint_resources=entrypoint_resources,
                      files=files + [CONFIG_IN_JOB])


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if any(fnmatch.fnmatch(n, pat) for pat in EXCLUDES)}


@contextmanager
def staged_working_dir(request: JobRequest) -> Iterator[Path]:
    """A temporary folder with the project packages and ``.cnc_job/config.yaml``; removed on exit.

    Ray zips and uploads it on submit (content-addressed, so identical stages upload once).
    """
    with tempfile.TemporaryDirectory(prefix="cnc-submit-") as tmp:
        root = Path(tmp)
        if request.ship_code:
            for name in SHIP_PACKAGES:
                src = Path(importlib.import_module(name).__file__).parent
                shutil.copytree(src, root / name, ignore=_ignore)
        (root / JOB_DIR).mkdir()
        (root / CONFIG_IN_JOB).write_text(request.config_yaml)
        yield root


class RayAuthError(UserError):
    """The cluster requires Ray token authentication and no token was found where Ray keeps it."""


AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_HELP = ("put the cluster's token in ~/.ray/auth_token (or set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file "
              "holding it)")


def ray_token_source(environ: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where Ray would read the user's token from: ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token`` (the first that is set / exists and is not empty), else ``None``. The token is not read."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return "$RAY_AUTH_TOKEN"
    for path in (env.get("RAY_AUTH_TOKEN_PATH"), str((home or Path.home()) / ".ray" / "auth_token")):
        if path and Path(path).is_file() and Path(path).stat().st_size > 0:
            return path
    return None


def is_auth_error(err: BaseException) -> bool:
    """Whether a Jobs API failure says the cluster wants a token (HTTP 401/403 or Ray's AuthenticationError)."""
    text = f"{type(err).__name__}: {err}".lower()
    return "authenticationerror" in text or "unauthorized" in text or " 401" in text or "status 401" in text or (
        "token" in text and ("auth" in text or "403" in text))


def _enable_token_auth() -> None:
    """Switch this process's Ray client to token mode (what exporting ``RAY_AUTH_MODE=token`` does)."""
    os.environ[AUTH_MODE_ENV] = "token"
    try:
        from ray._raylet import Config

        Config.initialize("")  # Ray caches its config at import; refresh it as Ray itself does
    except Exception:  # noqa: BLE001 - older/newer Ray: the environment variable is read when the client is built
        pass


def make_client(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (see :func:`resolve_address`).

    When the cluster requires Ray token authentication and ``RAY_AUTH_MODE`` is not ``token`` here, the user's
    token is used from where Ray keeps it (:func:`ray_token_source`); without one, :class:`RayAuthError` says in
    one line what to set. The token never leaves this process except in the request's ``Authorization`` header.
    """
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as err:
        if not is_auth_error(err):
            raise
        source = ray_token_source()
        if source is None:
            raise RayAuthError(f"the Ray cluster at {url} requires token authentication and no token was found: "
                               f"{TOKEN_HELP}") from None
        if os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
            raise RayAuthError(f"the Ray cluster at {url} refused the token from {source}: check that it is the "
                               f"cluster's token ({TOKEN_HELP})") from None
    logger.info("the Ray cluster at %s requires token authentication: using the token from %s (%s=token)", url, source,
                AUTH_MODE_ENV)
    _enable_token_auth()
    try:
        return JobSubmissionClient(url)
    except Exception as err:
        if is_auth_error(err):
            raise RayAuthError(f"the Ray cluster at {url} refused the token from {source}: check that it is the "
                               f"cluster's token ({TOKEN_HELP})") from None
        raise


def latest_attempt(client, run_id: str) -> tuple[int, object | None]:
    """``(attempt, JobDetails)`` of the newest attempt of ``run_id`` on the cluster; ``(0, None)`` if none."""
    best: tuple[int, object | None] = (0, None)
    for job in client.list_jobs():
        sid = getattr(job, "submission_id", None)
        if not sid:
            continue
        base, n = parse_attempt(sid)
        if base == run_id and n > best[0]:
            best = (n, job)
    return best


@dataclass
class SubmitResult:
    """What :func:`submit` did: ``action`` is ``submitted`` or ``attached``."""

    submission_id: str
    attempt: int
    action: str
    previous_status: str | None = None


def submit(client, request: JobRequest) -> SubmitResult:
    """Submit ``request`` as the next attempt of its run, or attach to an attempt that is still active."""
    attempt, job = latest_attempt(client, request.run_id)
    status = None if job is None else str(getattr(job.status, "value", job.status))
    if status in ACTIVE:
        return SubmitResult(attempt_id(request.run_id, attempt), attempt, "attached", status)
    sid = attempt_id(request.run_id, attempt + 1)
    with staged_working_dir(request) as stage:
        client.submit_job(
            entrypoint=request.entrypoint, submission_id=sid, runtime_env=request.runtime_env(str(stage)),
            metadata={**request.metadata, "cnc_attempt": str(attempt + 1)},
            entrypoint_num_cpus=request.entrypoint_num_cpus, entrypoint_num_gpus=request.entrypoint_num_gpus,
            entrypoint_resources=request.entrypoint_resources,
        )
    return SubmitResult(sid, attempt + 1, "submitted", status)


def job_status(client, submission_id: str) -> str:
    """Status name (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
    status = client.get_job_status(submission_id)
    return str(getattr(status, "value", status))


def exit_code(info) -> int:
    """Command exit code for a finished job: 0 on SUCCEEDED, the driver's code (or 1) otherwise."""
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code not in (0, None) and 0 < code < 256 else 1


def wait(client, submission_id: str, write: Callable[[str], None] | None = None, poll_s: float = 1.0,
         timeout_s: float | None = None):
    """Stream the job's logs to ``write`` (if given) until it finishes; return its ``JobDetails``.

    Logs come from ``tail_job_logs`` (websocket); if that fails, from polling ``get_job_logs``.

    Raises:
        TimeoutError: ``timeout_s`` passed before the job finished.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    written = [0]  # characters already written, shared with the tail coroutine
    tailed = write is None
    if write is not None:
        try:
            tail = _tail(client, submission_id, write, written)
            asyncio.run(tail if timeout_s is None else asyncio.wait_for(tail, timeout_s))
            tailed = True
        except Exception as err:  # noqa: BLE001 - websocket unavailable or dropped: fall back to polling
            logger.debug("log tail of %s failed (%s); polling", submission_id, err)
    while True:
        info = client.get_job_info(submission_id)
        status = str(getattr(info.status, "value", info.status))
        if not tailed:
            logs = client.get_job_logs(submission_id)
            if len(logs) > written[0]:
                write(logs[written[0]:])
                written[0] = len(logs)
        if status in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s}s")
        time.sleep(poll_s)


async def _tail(client, submission_id: str, write: Callable[[str], None], written: list[int]) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        write(chunk)
        written[0] += len(chunk)

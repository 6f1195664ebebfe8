"""What a cluster run is: kind, resolved config, paths, and the one command every launcher runs.

A :class:`RunSpec` is built once from ``--config``/``--set``/``--input``/``--output`` and handed to the three
launchers (Ray Jobs API, Slurm, KubeRay). They differ only in how they start Ray and deliver the config file; the
command is always ``python -m cnc.cli build|train --config <resolved> ...``.

The run identity :attr:`RunSpec.run_id` is ``cnc-<kind>-<sha12>`` where ``sha12`` hashes the kind, the output
location and the resolved config hash: the same run submitted twice has the same id, so launchers can find and
resume it, while a different config or output folder is a different run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cnc.config import (
    ConfigError,
    config_dict,
    config_hash,
    load_config,
)
from triplets.config import BuildConfig

logger = logging.getLogger(__name__)

KINDS = ("build", "train")

# kind -> "module:Class" of the pydantic config the entry command validates (imported lazily).
# Placeholders a user-supplied entrypoint template may use (``--entrypoint``).
TEMPLATE_FIELDS = ("python", "config", "input", "output", "address", "workers")


def _config_model(kind: str):
    """The pydantic class validating ``kind``'s config (imports stay light: pydantic models only)."""
    if kind == "build":
        return BuildConfig
    from cnc_model.training.config import TrainConfig

    return TrainConfig


def resolve_config(kind: str, path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read ``path``, apply ``key=value`` overrides and validate with the kind's config model.

    Returns the resolved config as a JSON-safe dict (every default filled in), which is what gets shipped, so the
    job runs exactly the config the submitter saw even if defaults change on the cluster.

    Raises:
        ConfigError: unknown kind, missing file, or invalid config.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown run kind {kind!r}; valid: {', '.join(KINDS)}")
    return config_dict(load_config(_config_model(kind), path, overrides))


def cluster_path(value: str | None, option: str) -> str | None:
    """Normalise a path the *cluster* will open: an absolute path or a URI (``s3://...``, ``pipe:``), never relative.

    A relative path would resolve inside the job's temporary working directory (Ray Jobs) or the head's cwd (Slurm),
    so outputs would vanish with the job; refusing it is clearer than guessing.
    """
    if value is None:
        return None
    if "://" in value or value.startswith("pipe:"):
        return value.rstrip("/")
    if not value.startswith("/"):
        raise ConfigError(f"{option} {value!r} must be an absolute path or a URI (s3://..., gs://...) that every "
                          "node of the cluster can open")
    return posixpath.normpath(value)


def _quote(arg: str) -> str:
    """Shell-quote ``arg``; a ``$VAR`` reference is double-quoted so the launcher's shell expands it."""
    if arg.startswith("$") and arg[1:].replace("_", "").isalnum():
        return f'"{arg}"'
    return shlex.quote(arg)


@dataclass(frozen=True)
class RunSpec:
    """One build or training run, as every launcher sees it.

    Attributes:
        kind: ``build`` or ``train``.
        config: resolved config (JSON-safe dict).
        input: input location seen by the cluster (build only), absolute path or URI.
        output: output location seen by the cluster, absolute path or URI.
        workers: ``train`` only: Ray Train workers (one per GPU); 0 = the trainer's single-process path.
        gpu: ``train`` only: Ray Train workers take one GPU each (``--no-gpu`` otherwise).
        extra_args: further arguments appended to the entry command (e.g. ``--retry-failed``).
    """

    kind: str
    config: dict
    input: str | None = None
    output: str | None = None
    workers: int = 0
    gpu: bool = True
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown run kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.kind == "build" and (self.input is None or self.output is None):
            raise ConfigError("a build needs --input and --output")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        object.__setattr__(self, "input", cluster_path(self.input, "--input"))
        object.__setattr__(self, "output", cluster_path(self.output, "--output"))

    @property
    def config_hash(self) -> str:
        """16-hex hash of the resolved config (same as the builder's ``config_hash``)."""
        return config_hash(self.config)

    @property
    def run_id(self) -> str:
        """``cnc-<kind>-<sha12>``: a pure function of kind, output location and config hash."""
        key = json.dumps({"kind": self.kind, "output": self.output or "", "config": self.config_hash}, sort_keys=True)
        return f"cnc-{self.kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def config_yaml(self) -> str:
        """The resolved config as YAML text (what the launchers write to the shipped config file)."""
        return yaml.safe_dump(self.config, sort_keys=False)

    def command(self, *, config_path: str, address: str | None, python: str = "python",
                template: str | None = None) -> str:
        """The shell command that runs this spec on the cluster.

        Args:
            config_path: where the resolved config file is, as seen by the command.
            address: Ray address the driver joins (``auto`` inside a Ray job; ``$RAY_ADDRESS`` on Slurm); None
                leaves it to ``RAY_ADDRESS`` in the environment.
            python: interpreter on the cluster.
            template: optional replacement command with ``{python}``, ``{config}``, ``{input}``, ``{output}``,
                ``{address}``, ``{workers}`` placeholders (values are shell-quoted).
        """
        if template is not None:
            values = {"python": python, "config": config_path, "input": self.input or "", "output": self.output or "",
                      "address": address or "", "workers": str(self.workers)}
            try:
                return template.format(**{k: _quote(v) for k, v in values.items()})
            except (KeyError, IndexError) as err:
                raise ConfigError(f"--entrypoint template uses unknown placeholder {err}; valid: "
                                  + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)) from None
        args = [python, "-u", "-m", "cnc.cli", self.kind, "--config", config_path]
        if self.kind == "build":
            args += ["--input", self.input, "--output", self.output]
            if address is not None:
                args += ["--address", address]
        else:
            # output and shards live in the config (output_dir, data.train_shards); `latest` restarts from the
            # newest checkpoint in output_dir, or from scratch when there is none, so resubmitting resumes.
            args += ["--resume", "latest"]
            if self.workers > 0:
                args += ["--workers", str(self.workers)]
                if address is not None:
                    args += ["--address", address]
                if not self.gpu:
                    args += ["--no-gpu"]
        args += list(self.extra_args)
        return " ".join(_quote(a) for a in args)


def make_spec(kind: str, config_path: str | Path, overrides: list[str] | None = None, *, input: str | None = None,
              output: str | None = None, workers: int = 0, gpu: bool = True,
              extra_args: tuple[str, ...] = ()) -> RunSpec:
    """Resolve the config and build the :class:`RunSpec` of a ``cnc submit`` / ``cnc render-job`` call.

    For ``train``, ``--output`` and ``--input`` become the config's ``output_dir`` and ``data.train_shards`` (the
    trainer reads both from its config), and every shard location must be absolute or a URI.
    """
    overrides = list(overrides or [])
    if kind == "train":
        # JSON is valid YAML, so these overrides carry any path (commas, braces) unchanged.
        if output is not None:
            overrides.append(f"output_dir={json.dumps(cluster_path(output, '--output'))}")
        if input is not None:
            overrides.append(f"data.train_shards={json.dumps([cluster_path(input, '--input')])}")
        input = None
    config = resolve_config(kind, config_path, overrides)
    if kind == "train":
        output = config.get("output_dir")
        if not output:
            raise ConfigError("a training run needs output_dir in its config, or --output")
        shards = list(config.get("data", {}).get("train_shards") or [])
        shards += list(config.get("validation", {}).get("shards") or [])
        for shard in shards:
            cluster_path(shard, "data.train_shards entry")
        output = cluster_path(output, "output_dir")
    return RunSpec(kind=kind, config=config, input=input, output=output, workers=workers, gpu=gpu,
                   extra_args=tuple(extra_args))

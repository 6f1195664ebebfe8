"""Render ``jobs/slurm/ray_job.sh.tmpl`` into an sbatch script for a :class:`~jobs.run.RunSpec`.

The template uses ``@@{name}`` placeholders (a :class:`string.Template` with delimiter ``@@``) so the many ``$``
of the bash script need no escaping; every placeholder must be filled (``substitute``, not ``safe_substitute``).

The script binds Ray to the head node's IP: submitting it is the user choosing a cluster. The dashboard stays on
``127.0.0.1`` unless ``dashboard_host`` says otherwise.
"""

from __future__ import annotations

import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path

from cnc.config import ConfigError
from jobs.run import RunSpec

TEMPLATE = Path(__file__).parent / "slurm" / "ray_job.sh.tmpl"
# Default port block: 40 disjoint blocks of 1000 ports from 20000, picked by job id.
AUTO_PORT_BASE = "$((20000 + (${SLURM_JOB_ID:-0} % 40) * 1000))"


class _Template(string.Template):
    delimiter = "@@"


@dataclass
class SlurmOptions:
    """Allocation and environment of the sbatch script.

    Attributes:
        nodes: nodes to allocate (one Ray node each; the first is the head and also runs work).
        gpus_per_node: GPUs per node, given to Slurm (``--gpus-per-task``) and Ray (``--num-gpus``).
        cpus_per_node: CPUs per node, given to Slurm (``--cpus-per-task``) and Ray (``--num-cpus``).
        time: wall-clock limit (``HH:MM:SS`` or ``D-HH:MM:SS``).
        partition, account, qos, mem: optional ``#SBATCH`` values (``mem`` e.g. ``128G``).
        exclusive: add ``#SBATCH --exclusive``.
        python: interpreter on the nodes that has ``cnc`` and Ray installed.
        setup: shell lines run first on the head (``module load ...``, ``source .../activate``).
        port_base: first of 1000 ports the job uses; default derives a block from ``SLURM_JOB_ID``.
        dashboard_host: dashboard bind address on the head.
        log_file: ``#SBATCH --output`` pattern.
        sbatch_args: further ``#SBATCH`` options, e.g. ``--constraint=a100``.
        startup_timeout_s: how long to wait for the head and the workers.
    """

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 8
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    exclusive: bool = False
    python: str = "python"
    setup: list[str] = field(default_factory=list)
    port_base: int | None = None
    dashboard_host: str = "127.0.0.1"
    log_file: str = "cnc-%x-%j.out"
    sbatch_args: list[str] = field(default_factory=list)
    startup_timeout_s: int = 300

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid value."""
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0 or self.cpus_per_node < 1:
            raise ConfigError(f"need --gpus-per-node >= 0 and --cpus-per-node >= 1, got {self.gpus_per_node}, "
                              f"{self.cpus_per_node}")
        if self.port_base is not None and not 1024 <= self.port_base <= 64535:
            raise ConfigError(f"--port-base must be in 1024..64535 (the job uses 1000 ports), got {self.port_base}")


def _sbatch_lines(opts: SlurmOptions) -> str:
    lines = []
    if opts.gpus_per_node > 0:
        lines.append(f"--gpus-per-task={opts.gpus_per_node}")
    for key in ("partition", "account", "qos", "mem"):
        value = getattr(opts, key)
        if value:
            lines.append(f"--{key}={value}")
    if opts.exclusive:
        lines.append("--exclusive")
    lines += opts.sbatch_args
    for line in lines:
        if "\n" in line:
            raise ConfigError(f"#SBATCH option {line!r} must be one line")
    return "".join(f"#SBATCH {shlex.quote(line) if ' ' in line else line}\n" for line in lines)


def render_slurm(spec: RunSpec, opts: SlurmOptions, *, script_name: str = "job.sbatch",
                 entrypoint_template: str | None = None) -> str:
    """The sbatch script (text) that runs ``spec`` on a fresh Ray cluster over the allocation."""
    opts.check()
    config_yaml = spec.config_yaml()
    if "CNC_CONFIG_EOF" in config_yaml:
        raise ConfigError("the config contains the heredoc marker CNC_CONFIG_EOF")
    command = spec.command(config_path="$CNC_CONFIG", address="$RAY_ADDRESS", python="$PYTHON",
                           template=entrypoint_template)
    values = {
        "kind": spec.kind, "run_id": spec.run_id, "config_hash": spec.config_hash, "job_name": spec.run_id,
        "script_name": script_name, "nodes": opts.nodes, "cpus_per_node": opts.cpus_per_node,
        "gpus_per_node": opts.gpus_per_node, "time": opts.time, "log_file": opts.log_file,
        "sbatch_extra": _sbatch_lines(opts), "setup": "\n".join(opts.setup), "python": shlex.quote(opts.python),
        "dashboard_host": shlex.quote(opts.dashboard_host), "startup_timeout_s": opts.startup_timeout_s,
        "port_base": AUTO_PORT_BASE if opts.port_base is None else opts.port_base,
        "config_yaml": config_yaml if config_yaml.endswith("\n") else config_yaml + "\n", "command": command,
    }
    return _Template(TEMPLATE.read_text()).substitute(values)

"""Sub-commands of ``cnc`` that belong to ``jobs``: ``submit``, ``jobs status|logs|stop|list``, ``render-job``.

    cnc submit build --address http://HEAD:8265 --config configs/build/default.yaml \\
        --input /shared/photos --output /shared/shards/run1 --wait
    cnc jobs list
    cnc render-job slurm build --config ... --input ... --output ... --nodes 4 --gpus-per-node 8 -o build.sbatch
    cnc render-job k8s train --config ... --image REGISTRY/cnc:TAG --nodes 2 --gpus-per-node 8 --pvc shared -o job.yaml

Ray and the cluster are only touched inside the commands, so ``cnc --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer

from cnc.base.errors import UserError
from cnc.config import ConfigError, parse_override

jobs_app = typer.Typer(help="Inspect and control Ray jobs (Ray Jobs API).", no_args_is_help=True)

ADDRESS_HELP = "Ray Jobs API (dashboard) URL; default $RAY_ADDRESS, else http://127.0.0.1:8265."


class Kind(str, Enum):
    build = "build"
    train = "train"


class Target(str, Enum):
    slurm = "slurm"
    k8s = "k8s"


def _env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--env {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def _spec(kind: Kind, config: Path, overrides: list[str], input_: str | None, output: str | None, workers: int,
          extra: list[str], gpu: bool = True):
    from jobs.run import make_spec

    for item in overrides:
        parse_override(item)  # reject malformed overrides before any work
    return make_spec(kind.value, config, overrides, input=input_, output=output, workers=workers, gpu=gpu,
                     extra_args=tuple(extra))


def _client(address: str | None):
    from jobs.submit import RayAuthError, make_client, resolve_address

    try:
        return make_client(address)
    except RayAuthError:
        raise  # one line, exit 2 (cnc.cli)
    except Exception as err:  # noqa: BLE001 - connection refused, bad URL
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot use the Ray Jobs API at {resolve_address(address)}: {first}") from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _follow(client, submission_id: str):
    """Stream logs until the job ends; Ctrl-C detaches (the job keeps running) with exit code 130."""
    from jobs.submit import wait as wait_job

    try:
        return wait_job(client, submission_id, write=_write)
    except KeyboardInterrupt:
        typer.echo(f"\ndetached; {submission_id} keeps running (cnc jobs stop {submission_id} to stop it)", err=True)
        raise typer.Exit(code=130) from None


# Shared options (typer needs them per command; these keep help texts identical).
_CONFIG = typer.Option(..., "--config", "-c", help="Config YAML (configs/build/*.yaml, configs/train/*.yaml).")
_SET = typer.Option([], "--set", help="Config override key.sub=value (repeatable).")
_INPUT = typer.Option(None, "--input", "-i", help="Input as the cluster sees it (absolute path or URI); train: sets "
                                            "data.train_shards.")
_OUTPUT = typer.Option(None, "--output", "-o", help="Output as the cluster sees it (absolute path or URI); train: sets "
                                              "output_dir.")
_ENTRYPOINT = typer.Option(None, "--entrypoint", help="Replace the command; placeholders {python} {config} {input} "
                                                      "{output} {address} {workers}.")
_RETRY = typer.Option(False, "--retry-failed", help="build: also retry samples that failed before.")


def submit(
    kind: Kind = typer.Argument(..., help="build or train."),
    config: Path = _CONFIG,
    overrides: list[str] = _SET,
    input_: str = _INPUT,
    output: str = _OUTPUT,
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
    workers: int = typer.Option(1, "--workers", help="train: Ray Train workers, one per GPU (0 = single process)."),
    gpu: bool = typer.Option(True, "--gpu/--no-gpu", help="train: one GPU per Ray Train worker."),
    wait: bool = typer.Option(False, "--wait", help="Stream the logs; exit with the job's status."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be submitted; contact nothing."),
    python: str = typer.Option("python", "--python", help="Python on the cluster that has Ray and cnc's deps."),
    env: list[str] = typer.Option([], "--env", help="Extra env var KEY=VALUE for the job (no credentials)."),
    ship_code: bool = typer.Option(True, "--ship-code/--no-ship-code",
                                   help="Upload the cnc packages in working_dir (off: use those installed on the "
                                        "cluster)."),
    num_cpus: float = typer.Option(None, "--entrypoint-num-cpus", help="CPUs reserved for the driver."),
    num_gpus: float = typer.Option(None, "--entrypoint-num-gpus",
                                   help="GPUs reserved for the driver (default 0; 1 for train --workers 0)."),
    retry_failed: bool = _RETRY,
    entrypoint: str = _ENTRYPOINT,
) -> None:
    """Submit a build or training run to a Ray cluster; resubmitting the same run resumes it."""
    from jobs.submit import attempt_id, build_request, exit_code
    from jobs.submit import submit as submit_job

    try:
        spec = _spec(kind, config, overrides, input_, output, workers if kind is Kind.train else 0,
                     ["--retry-failed"] if retry_failed else [], gpu=gpu)
        request = build_request(spec, python=python, env=_env(env), ship_code=ship_code,
                                entrypoint_template=entrypoint, entrypoint_num_cpus=num_cpus,
                                entrypoint_num_gpus=num_gpus)
    except ConfigError as err:
        raise UserError(str(err)) from None
    if dry_run:
        typer.echo(json.dumps(request.describe(), indent=2))
        return
    client = _client(address)
    try:
        result = submit_job(client, request)
    except RuntimeError as err:
        raise UserError(f"submission of {attempt_id(request.run_id, 1)} failed: {err}") from None
    if result.action == "attached":
        typer.echo(f"{result.submission_id} is already {result.previous_status}; attaching instead of resubmitting")
    else:
        after = f" (previous attempt {result.previous_status})" if result.previous_status else ""
        typer.echo(f"submitted {result.submission_id} (attempt {result.attempt}){after}")
    if not wait:
        typer.echo(f"follow: cnc jobs logs {result.submission_id} --follow")
        return
    info = _follow(client, result.submission_id)
    status = str(getattr(info.status, "value", info.status))
    typer.echo(f"\n{result.submission_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" else ""))
    raise typer.Exit(code=exit_code(info))


@jobs_app.command("status")
def status(
    submission_id: str = typer.Argument(..., help="Submission id (cnc-build-<sha>[-rN])."),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the job's details as JSON."),
) -> None:
    """Status of a job."""
    client = _client(address)
    try:
        info = client.get_job_info(submission_id)
    except RuntimeError as err:
        raise UserError(str(err)) from None
    if as_json:
        typer.echo(json.dumps(info.dict(), default=str, indent=2))
        return
    value = str(getattr(info.status, "value", info.status))
    code = getattr(info, "driver_exit_code", None)
    typer.echo(f"{submission_id}: {value}" + (f" exit={code}" if code is not None else "")
               + (f" - {info.message}" if info.message else ""))


@jobs_app.command("logs")
def logs(
    submission_id: str = typer.Argument(..., help="Submission id."),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends; exit with its status."),
) -> None:
    """Print a job's logs."""
    from jobs.submit import exit_code

    client = _client(address)
    try:
        if not follow:
            _write(client.get_job_logs(submission_id))
            return
        info = _follow(client, submission_id)
    except RuntimeError as err:
        raise UserError(str(err)) from None
    raise typer.Exit(code=exit_code(info))


@jobs_app.command("stop")
def stop(
    submission_id: str = typer.Argument(..., help="Submission id."),
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the job has stopped."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the stop."),
) -> None:
    """Stop a running job (the run resumes when resubmitted)."""
    from jobs.submit import wait as wait_job

    client = _client(address)
    try:
        stopped = client.stop_job(submission_id)
        if not stopped:
            typer.echo(f"{submission_id} was not running")
        if wait:
            info = wait_job(client, submission_id, timeout_s=timeout)
            typer.echo(f"{submission_id}: {getattr(info.status, 'value', info.status)}")
    except (RuntimeError, TimeoutError) as err:
        raise UserError(str(err)) from None


@jobs_app.command("list")
def list_jobs(
    address: str = typer.Option(None, "--address", help=ADDRESS_HELP),
    show_all: bool = typer.Option(False, "--all", help="Also jobs not submitted by cnc."),
) -> None:
    """List jobs: submission id, status, kind, attempt, output."""
    client = _client(address)
    rows = []
    for job in client.list_jobs():
        meta = job.metadata or {}
        if not job.submission_id or (not show_all and "cnc_run" not in meta):
            continue
        rows.append((job.start_time or 0, job.submission_id, str(getattr(job.status, "value", job.status)),
                     meta.get("cnc_kind", "-"), meta.get("cnc_attempt", "-"), meta.get("cnc_output", "-")))
    for *_, sid, st, kind, attempt, out in sorted(rows):
        typer.echo(f"{sid}\t{st}\t{kind}\tattempt={attempt}\t{out}")


def render_job(
    target: Target = typer.Argument(..., help="slurm or k8s."),
    kind: Kind = typer.Argument(..., help="build or train."),
    config: Path = _CONFIG,
    overrides: list[str] = _SET,
    input_: str = _INPUT,
    output: str = _OUTPUT,
    nodes: int = typer.Option(1, "--nodes", help="Nodes (Slurm) / worker pods (k8s)."),
    gpus_per_node: int = typer.Option(None, "--gpus-per-node", help="GPUs per node (default: Slurm 0, k8s 1)."),
    cpus_per_node: int = typer.Option(8, "--cpus-per-node", help="CPUs per node."),
    workers: int = typer.Option(None, "--workers", help="train: Ray Train workers (default nodes x GPUs per node)."),
    python: str = typer.Option("python", "--python", help="Python on the nodes / in the image."),
    retry_failed: bool = _RETRY,
    entrypoint: str = _ENTRYPOINT,
    out_file: Path = typer.Option(None, "--output-file", help="Write the script/manifest here instead of stdout "
                                  "(-o is --output, the job's output location, as in every command)."),
    # Slurm
    partition: str = typer.Option(None, "--partition", help="Slurm partition."),
    account: str = typer.Option(None, "--account", help="Slurm account."),
    time: str = typer.Option("24:00:00", "--time", help="Slurm time limit."),
    mem: str = typer.Option(None, "--mem", help="Slurm memory per node, e.g. 256G."),
    exclusive: bool = typer.Option(False, "--exclusive", help="Slurm: whole nodes."),
    setup: list[str] = typer.Option([], "--setup", help="Slurm: shell line run first (module load, activate)."),
    port_base: int = typer.Option(None, "--port-base", help="Slurm: first of 1000 ports (default from job id)."),
    dashboard_host: str = typer.Option("127.0.0.1", "--dashboard-host", help="Slurm: dashboard bind address."),
    sbatch_arg: list[str] = typer.Option([], "--sbatch-arg", help="Slurm: extra #SBATCH option (repeatable)."),
    # Kubernetes
    image: str = typer.Option(None, "--image", help="k8s: image with cnc installed (required for k8s)."),
    namespace: str = typer.Option(None, "--namespace", help="k8s namespace."),
    memory_per_node: str = typer.Option("32Gi", "--memory-per-node", help="k8s: worker pod memory."),
    pvc: str = typer.Option(None, "--pvc", help="k8s: ReadWriteMany PVC shared by all pods (outputs)."),
    mount_path: str = typer.Option("/data", "--mount-path", help="k8s: where the PVC is mounted."),
    secret: list[str] = typer.Option([], "--secret", help="k8s: secret name exposed as env vars (repeatable)."),
    env: list[str] = typer.Option([], "--env", help="k8s: extra env var KEY=VALUE (no credentials)."),
    backoff_limit: int = typer.Option(2, "--backoff-limit", help="k8s: retries (each a new RayCluster)."),
    active_deadline: int = typer.Option(86400, "--active-deadline", help="k8s: activeDeadlineSeconds."),
) -> None:
    """Render an sbatch script (slurm) or a KubeRay RayJob (k8s) that runs the same command as `cnc submit`."""
    from jobs.render_k8s import K8sOptions, render_k8s
    from jobs.render_slurm import SlurmOptions, render_slurm

    if output and output.endswith((".sbatch", ".sh", ".yaml", ".yml")) and out_file is None:
        raise UserError(f"--output/-o is the job's output location, not the file to write ({output!r}): use "
                        f"--output-file {output}")
    gpus = gpus_per_node if gpus_per_node is not None else (1 if target is Target.k8s else 0)
    n_workers = 0 if kind is Kind.build else (workers if workers is not None else nodes * (gpus or 1))
    extra = ["--retry-failed"] if retry_failed else []
    try:
        spec = _spec(kind, config, overrides, input_, output, n_workers, extra, gpu=gpus > 0)
        if target is Target.slurm:
            opts = SlurmOptions(nodes=nodes, gpus_per_node=gpus, cpus_per_node=cpus_per_node, time=time,
                                partition=partition, account=account, mem=mem, exclusive=exclusive, python=python,
                                setup=list(setup), port_base=port_base, dashboard_host=dashboard_host,
                                sbatch_args=list(sbatch_arg))
            text = render_slurm(spec, opts, script_name=out_file.name if out_file else "job.sbatch",
                                entrypoint_template=entrypoint)
        else:
            opts = K8sOptions(image=image or "", nodes=nodes, gpus_per_node=gpus, cpus_per_node=cpus_per_node,
                              memory_per_node=memory_per_node, namespace=namespace, pvc=pvc, mount_path=mount_path,
                              secrets=list(secret), env=_env(env), backoff_limit=backoff_limit,
                              active_deadline_s=active_deadline, python=python)
            text = render_k8s(spec, opts, entrypoint_template=entrypoint)
    except ConfigError as err:
        raise UserError(str(err)) from None
    if out_file is None:
        _write(text)
        return
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text)
    typer.echo(f"wrote {out_file} (run {spec.run_id})")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("submit")(submit)
    app.command("render-job")(render_job)
    app.add_typer(jobs_app, name="jobs")

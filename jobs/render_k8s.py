"""Render a KubeRay ``RayJob`` (plus the ConfigMap holding the resolved config) for a :class:`~jobs.run.RunSpec`.

``jobs/k8s/rayjob.yaml`` is the skeleton; this module fills it in as a dict and dumps it with ``yaml.safe_dump``.
The output is two YAML documents (ConfigMap, RayJob) for one ``kubectl apply -f``.

The image must contain ``cnc`` and its dependencies (KubeRay cannot upload a local ``working_dir``). Outputs must be
on storage every pod sees: a ReadWriteMany PVC mounted with ``pvc`` (checked: the output must be under the mount),
or a URI. Credentials never appear in the manifest: ``secrets`` names Kubernetes secrets whose keys become env vars
of every Ray container (``envFrom.secretRef``).
"""

from __future__ import annotations

import copy
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cnc.config import ConfigError
from jobs.run import RunSpec
from jobs.submit import DEFAULT_ENV, check_env

SKELETON = Path(__file__).parent / "k8s" / "rayjob.yaml"
#: RFC 1123 subdomain (PVC and secret names) and label (namespace), as the Kubernetes API validates them.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_k8s_name(option: str, value: str, label: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a valid Kubernetes object name (RFC 1123)."""
    limit, pattern = (63, _DNS_LABEL) if label else (253, _DNS_SUBDOMAIN)
    if not (isinstance(value, str) and len(value) <= limit and pattern.match(value)):
        chars = "lower-case letters, digits and '-'" + ("" if label else " or '.'")
        raise ConfigError(f"{option} {value!r} is not a valid Kubernetes name (RFC 1123 "
                          f"{'label' if label else 'subdomain'}: at most {limit} {chars}, starting and ending with "
                          f"a letter or digit)")


CONFIG_MOUNT = "/etc/cnc"


@dataclass
class K8sOptions:
    """Cluster shape and Kubernetes settings of the RayJob.

    Attributes:
        image: container image with ``cnc`` installed (required).
        nodes: worker pods (replicas of the one worker group).
        gpus_per_node, cpus_per_node, memory_per_node: requests = limits of each worker pod (``nvidia.com/gpu``).
        head_cpus, head_memory: head pod resources (the head runs no work, only the driver).
        namespace: optional ``metadata.namespace``.
        pvc: ReadWriteMany PersistentVolumeClaim mounted at ``mount_path`` on every pod (shared outputs).
        secrets: names of Kubernetes secrets exposed as env vars on every Ray container.
        env: extra non-secret env vars for the job (``runtimeEnvYAML``).
        backoff_limit, active_deadline_s, ttl_after_finished_s: RayJob lifecycle.
        python: interpreter in the image.
        ray_version: ``rayClusterSpec.rayVersion`` (default: the local Ray's version).
    """

    image: str
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_node: int = 8
    memory_per_node: str = "32Gi"
    head_cpus: int = 2
    head_memory: str = "8Gi"
    namespace: str | None = None
    pvc: str | None = None
    mount_path: str = "/data"
    secrets: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    backoff_limit: int = 2
    active_deadline_s: int = 86400
    ttl_after_finished_s: int = 60
    python: str = "python"
    ray_version: str | None = None

    def check(self, spec: RunSpec) -> None:
        """Raise :class:`ConfigError` naming the first invalid value."""
        if not self.image:
            raise ConfigError("--image is required: an image with cnc and its dependencies installed")
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_node < 1:
            raise ConfigError(f"need --nodes >= 1, --gpus-per-node >= 0, --cpus-per-node >= 1; got {self.nodes}, "
                              f"{self.gpus_per_node}, {self.cpus_per_node}")
        if self.backoff_limit < 0 or self.active_deadline_s < 1:
            raise ConfigError("--backoff-limit must be >= 0 and --active-deadline must be >= 1")
        check_env(self.env)
        if self.pvc is not None:
            check_k8s_name("--pvc", self.pvc)
        for name in self.secrets:
            check_k8s_name("--secret", name)
        if self.namespace is not None:
            check_k8s_name("--namespace", self.namespace, label=True)
        if self.pvc and not posixpath.isabs(self.mount_path):
            raise ConfigError(f"--mount-path {self.mount_path!r} must be an absolute path")
        if self.pvc:
            mount = posixpath.normpath(self.mount_path)
            for name, path in (("--output", spec.output), ("--input", spec.input)):
                if path and "://" not in path and not (path + "/").startswith(mount + "/"):
                    raise ConfigError(f"{name} {path!r} is not on the shared volume {self.pvc!r} mounted at {mount}")


def _ray_version() -> str:
    import ray

    return ray.__version__


def _container(c: dict, opts: K8sOptions, resources: dict, mounts: list[dict]) -> None:
    c["image"] = opts.image
    c["resources"] = resources
    c["volumeMounts"] = mounts
    if opts.secrets:
        c["envFrom"] = [{"secretRef": {"name": s}} for s in opts.secrets]


def render_k8s(spec: RunSpec, opts: K8sOptions, *, entrypoint_template: str | None = None) -> str:
    """ConfigMap + RayJob manifests (YAML text) that run ``spec`` on a fresh KubeRay cluster."""
    opts.check(spec)
    name = spec.run_id
    labels = {"app.kubernetes.io/name": "cnc", "app.kubernetes.io/component": spec.kind, "cnc/run-id": name,
              "cnc/config-hash": spec.config_hash}
    meta = {"name": name, "labels": labels, **({"namespace": opts.namespace} if opts.namespace else {})}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": f"{name}-config"},
                  "data": {"config.yaml": spec.config_yaml()}}

    job = yaml.safe_load(SKELETON.read_text())
    job["metadata"] = {**meta, "labels": {**job["metadata"]["labels"], **labels}}
    s = job["spec"]
    s["entrypoint"] = spec.command(config_path=f"{CONFIG_MOUNT}/config.yaml", address="auto", python=opts.python,
                                   template=entrypoint_template)
    s["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": {**DEFAULT_ENV, **opts.env}}, sort_keys=True)
    s["backoffLimit"] = opts.backoff_limit
    s["activeDeadlineSeconds"] = opts.active_deadline_s
    s["ttlSecondsAfterFinished"] = opts.ttl_after_finished_s
    if spec.kind == "train" and spec.workers == 0 and spec.gpu and opts.gpus_per_node > 0:
        s["entrypointNumGpus"] = 1  # single-process trainer: put the driver on a GPU worker
    cluster = s["rayClusterSpec"]
    cluster["rayVersion"] = opts.ray_version or _ray_version()

    volumes = [{"name": "cnc-config", "configMap": {"name": f"{name}-config"}}]
    mounts = [{"name": "cnc-config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    if opts.pvc:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": opts.pvc}})
        mounts.append({"name": "shared", "mountPath": opts.mount_path})

    head = cluster["headGroupSpec"]["template"]["spec"]
    head_res = {"cpu": str(opts.head_cpus), "memory": opts.head_memory}
    _container(head["containers"][0], opts, {"requests": head_res, "limits": dict(head_res)}, copy.deepcopy(mounts))
    head["volumes"] = copy.deepcopy(volumes)

    group = cluster["workerGroupSpecs"][0]
    group["groupName"] = "gpu-workers" if opts.gpus_per_node else "cpu-workers"
    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = opts.nodes
    group["rayStartParams"] = {"num-cpus": str(opts.cpus_per_node), "num-gpus": str(opts.gpus_per_node)}
    worker_res = {"cpu": str(opts.cpus_per_node), "memory": opts.memory_per_node}
    if opts.gpus_per_node:
        worker_res["nvidia.com/gpu"] = str(opts.gpus_per_node)
    worker = group["template"]["spec"]
    _container(worker["containers"][0], opts, {"requests": worker_res, "limits": dict(worker_res)},
               copy.deepcopy(mounts))
    worker["volumes"] = copy.deepcopy(volumes)

    header = (f"# Rendered by `cnc render-job k8s {spec.kind}` for run {name} (config hash {spec.config_hash}).\n"
              f"# Apply: kubectl apply -f <this file>; watch: kubectl get rayjob {name}; "
              f"clean up: kubectl delete -f <this file>.\n")
    if not opts.pvc and any(p and "://" not in p for p in (spec.output, spec.input)):
        header += ("# NOTE: --input/--output are local paths but no --pvc was given: they must exist on every pod\n"
                   "# (a shared volume baked into the image or node); otherwise retries cannot resume.\n")
    return header + yaml.safe_dump_all([config_map, job], sort_keys=False)

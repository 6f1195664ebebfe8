"""Cluster-free tests of ``jobs/``: run ids, attempt scheme, dry-run, Slurm and KubeRay rendering."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from cnc.cli import app
from cnc.config import ConfigError
from jobs.render_k8s import K8sOptions, render_k8s
from jobs.render_slurm import SlurmOptions, render_slurm
from jobs.run import RunSpec, cluster_path, make_spec, resolve_config
from jobs.submit import (
    attempt_id,
    build_request,
    check_env,
    parse_attempt,
    resolve_address,
    submit,
)
from tests.support import REPO

TINY = str(REPO / "configs" / "build" / "tiny.yaml")
TRAIN_TINY = str(REPO / "configs" / "train" / "tiny.yaml")
SECRET = "hf_do_not_ship_me_0123456789"


def _spec(output: str = "/shared/out", overrides: list[str] | None = None, **kw) -> RunSpec:
    return RunSpec(kind="build", config=resolve_config("build", TINY, overrides), input="/shared/in", output=output,
                   **kw)


# -- run identity ----------------------------------------------------------------------------
def test_run_id_is_a_function_of_output_and_config():
    a = _spec()
    assert a.run_id == _spec().run_id
    assert a.run_id.startswith("cnc-build-") and len(a.run_id) == len("cnc-build-") + 12
    assert _spec(output="/shared/out2").run_id != a.run_id
    assert _spec(overrides=["resolution=64"]).run_id != a.run_id
    # an override equal to the default is the same run (the config is resolved before hashing)
    assert _spec(overrides=["resolution=128"]).run_id == a.run_id
    assert _spec(output="/shared/./out/").run_id == a.run_id  # paths are normalised


@pytest.mark.parametrize("sid,base,n", [("cnc-build-abc", "cnc-build-abc", 1), ("cnc-build-abc-r2", "cnc-build-abc", 2),
                                        ("cnc-train-0f-r13", "cnc-train-0f", 13)])
def test_attempt_ids_round_trip(sid, base, n):
    assert parse_attempt(sid) == (base, n)
    assert attempt_id(base, n) == sid


def test_relative_paths_and_credentials_are_refused():
    with pytest.raises(ConfigError, match="absolute path or a URI"):
        cluster_path("out/run1", "--output")
    assert cluster_path("s3://bucket/run/", "--output") == "s3://bucket/run"
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        check_env({"HF_TOKEN": "x", "HF_HOME": "/cache"})
    assert check_env({"HF_HOME": "/cache"}) == {"HF_HOME": "/cache"}


def test_address_defaults_to_loopback(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert resolve_address(None) == "http://10.0.0.5:8265"
    assert resolve_address("https://ray.example:443") == "https://ray.example:443"


# -- submission logic against a fake Jobs API -------------------------------------------------
class FakeClient:
    """The slice of ``JobSubmissionClient`` that :func:`jobs.submit.submit` uses."""

    def __init__(self, jobs: dict[str, str] | None = None):
        self.jobs = dict(jobs or {})
        self.submitted: list[dict] = []

    def list_jobs(self):
        return [SimpleNamespace(submission_id=k, status=SimpleNamespace(value=v)) for k, v in self.jobs.items()]

    def submit_job(self, **kw):
        stage = Path(kw["runtime_env"]["working_dir"])
        kw["files"] = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        kw["shipped_config"] = (stage / ".cnc_job" / "config.yaml").read_text()
        self.submitted.append(kw)
        self.jobs[kw["submission_id"]] = "PENDING"
        return kw["submission_id"]


def test_submit_ships_code_and_resolved_config():
    spec = _spec(overrides=["resolution=64"])
    client = FakeClient()
    result = submit(client, build_request(spec, python="/venv/bin/python"))
    assert (result.submission_id, result.attempt, result.action) == (spec.run_id, 1, "submitted")
    sent = client.submitted[0]
    assert sent["entrypoint"] == ("/venv/bin/python -u -m cnc.cli build --config .cnc_job/config.yaml "
                                  "--input /shared/in --output /shared/out --address auto")
    assert "cnc/cli.py" in sent["files"] and "pipelines/build.py" in sent["files"] and "jobs/slurm/ray_job.sh.tmpl" \
        in sent["files"]
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in sent["files"])
    assert yaml.safe_load(sent["shipped_config"]) == spec.config
    assert sent["metadata"]["cnc_run"] == spec.run_id and sent["metadata"]["cnc_attempt"] == "1"
    assert not Path(sent["runtime_env"]["working_dir"]).exists()  # staging folder removed after upload


@pytest.mark.parametrize("existing,expected_id,action", [
    ({}, "", "submitted"),
    ({"": "RUNNING"}, "", "attached"),
    ({"": "PENDING"}, "", "attached"),
    ({"": "FAILED"}, "-r2", "submitted"),
    ({"": "SUCCEEDED"}, "-r2", "submitted"),
    ({"": "FAILED", "-r2": "STOPPED", "other-job": "RUNNING"}, "-r3", "submitted"),
    ({"": "FAILED", "-r2": "RUNNING"}, "-r2", "attached"),
])
def test_resubmission_attaches_or_makes_a_new_attempt(existing, expected_id, action):
    spec = _spec()
    client = FakeClient({(spec.run_id + k if k != "other-job" else k): v for k, v in existing.items()})
    result = submit(client, build_request(spec, ship_code=False))
    assert result.submission_id == spec.run_id + expected_id
    assert result.action == action
    assert len(client.submitted) == (action == "submitted")


def test_train_entrypoint_uses_ray_train_workers():
    spec = make_spec("train", TRAIN_TINY, ["train.max_train_steps=2"], input="/shared/shards/{000000..000009}.tar",
                     output="/shared/ckpt", workers=4)
    assert spec.config["output_dir"] == "/shared/ckpt" and spec.output == "/shared/ckpt"
    assert spec.config["data"]["train_shards"] == ["/shared/shards/{000000..000009}.tar"]
    req = build_request(spec, python="python")
    assert req.entrypoint == ("python -u -m cnc.cli train --config .cnc_job/config.yaml --resume latest "
                              "--workers 4 --address auto")
    assert req.entrypoint_num_gpus is None  # Ray Train's workers request the GPUs
    assert build_request(RunSpec(kind="train", config={}, workers=0)).entrypoint_num_gpus == 1
    with pytest.raises(ConfigError, match="absolute"):
        make_spec("train", TRAIN_TINY, ["data.train_shards=[out/build]"], output="/shared/ckpt")
    with pytest.raises(ConfigError, match="output_dir"):
        make_spec("train", TRAIN_TINY)  # the tiny config's output_dir is relative
    custom = build_request(spec, entrypoint_template="{python} my_train.py --cfg {config} -n {workers}")
    assert custom.entrypoint == "python my_train.py --cfg .cnc_job/config.yaml -n 4"
    with pytest.raises(ConfigError, match="placeholder"):
        build_request(spec, entrypoint_template="{nope}")


# -- CLI: dry run -------------------------------------------------------------------------------
def test_dry_run_prints_id_and_no_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # never contacted
    args = ["submit", "build", "--config", TINY, "--set", "resolution=64", "--input", "/shared/in", "--output",
            "/shared/out", "--env", "HF_HOME=/cache", "--dry-run"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["submission_id"] == _spec(overrides=["resolution=64"]).run_id
    assert plan["runtime_env"]["env_vars"] == {"PYTHONUNBUFFERED": "1", "HF_HOME": "/cache"}
    assert "cnc.cli build --config .cnc_job/config.yaml" in plan["entrypoint"]
    assert SECRET not in res.output
    res = CliRunner().invoke(app, args[:-1] + ["--env", f"HF_TOKEN={SECRET}", "--dry-run"])
    assert res.exit_code == 2 and "credential-like" in res.output


def test_cli_errors_are_one_line():
    res = CliRunner().invoke(app, ["submit", "build", "--config", TINY, "--input", "rel/in", "--output", "/o",
                                   "--dry-run"])
    assert res.exit_code == 2 and "absolute path" in res.output
    res = CliRunner().invoke(app, ["submit", "build", "--config", TINY, "--set", "nope=1", "--input", "/i",
                                   "--output", "/o", "--dry-run"])
    assert res.exit_code == 2 and "nope" in res.output


# -- Slurm --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["build", "train"])
def test_sbatch_renders_and_passes_bash_n(tmp_path, kind):
    out = tmp_path / "job.sbatch"
    args = ["render-job", "slurm", kind, "--nodes", "3", "--gpus-per-node", "8", "--cpus-per-node", "64",
            "--partition", "gpu", "--time", "12:00:00", "--setup", "source /opt/venv/bin/activate",
            "--sbatch-arg", "--constraint=a100", "--output-file", str(out)]
    if kind == "build":
        args += ["--config", TINY, "--input", "/shared/in", "--output", "/shared/out", "--retry-failed"]
    else:
        args += ["--config", TRAIN_TINY, "--input", "/shared/shards", "--output", "/shared/ckpt"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    text = out.read_text()
    subprocess.run(["bash", "-n", str(out)], check=True)
    assert "@@" not in text
    for needle in ("#SBATCH --nodes=3", "#SBATCH --gpus-per-task=8", "#SBATCH --partition=gpu", "--num-gpus=",
                   "--num-cpus=", "--node-manager-port=", "--object-manager-port=", "--min-worker-port=",
                   "--max-worker-port=", "--dashboard-port=", "#SBATCH --constraint=a100",
                   "source /opt/venv/bin/activate", 'DASHBOARD_HOST=127.0.0.1'):
        assert needle in text, needle
    if kind == "build":
        assert ('"$PYTHON" -u -m cnc.cli build --config "$CNC_CONFIG" --input /shared/in --output /shared/out '
                '--address "$RAY_ADDRESS" --retry-failed') in text
        assert "resolution: 128" in text  # resolved config embedded
    else:
        assert ('"$PYTHON" -u -m cnc.cli train --config "$CNC_CONFIG" --resume latest --workers 24 '
                '--address "$RAY_ADDRESS"') in text
        assert "output_dir: /shared/ckpt" in text


def test_sbatch_script_runs_under_fake_slurm(tmp_path):
    """Execute the rendered script with stub srun/scontrol/python: order of steps and exit status."""
    spec = _spec()
    script = tmp_path / "job.sbatch"
    script.write_text(render_slurm(spec, SlurmOptions(nodes=2, gpus_per_node=1, python=str(tmp_path / "py"),
                                                      startup_timeout_s=10, port_base=30000)))
    calls = tmp_path / "calls.txt"
    stub = '#!/bin/bash\ncalls="{calls}"\necho "$(basename "$0") $*" >> "$calls"\n{body}\n'
    bodies = {
        "scontrol": "echo node-a; echo node-b",
        "srun": 'case "$*" in *hostname*) echo 10.1.2.3;; *) sleep 0.2;; esac',
        # like the real checks, `ray status` succeeds only once the head has started and the node count only once
        # the worker has: the stubs wait (bounded) for the background `srun ... start` stubs to log themselves
        "py": ('case "$*" in *" build "*) exit 7;; *" status "*) want="start --head";; '
               '*ray.nodes*) want="start --block --address";; *) exit 0;; esac; '
               'for _ in $(seq 200); do grep -q -- "$want" "$calls" && exit 0; sleep 0.1; done; exit 1'),
    }
    (tmp_path / "bin").mkdir()
    for name, body in bodies.items():
        path = tmp_path / ("bin" if name != "py" else "") / name
        path.write_text(stub.format(calls=calls, body=body))
        path.chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "42",
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 7, proc.stderr  # the command's status is the job's status
    log = calls.read_text().splitlines()
    head = next(i for i, line in enumerate(log) if "start --head" in line)
    worker = next(i for i, line in enumerate(log) if "start --block --address=10.1.2.3:30000" in line)
    run = next(i for i, line in enumerate(log) if " build " in line)
    assert head < worker < run
    assert "--node-ip-address=10.1.2.3 --port=30000" in log[head] and "--dashboard-host=127.0.0.1" in log[head]
    assert "--address 10.1.2.3:30000" in log[run]
    assert yaml.safe_load((tmp_path / ".cnc_job" / "42" / "config.yaml").read_text()) == spec.config


# -- Kubernetes ---------------------------------------------------------------------------------
def _docs(text: str) -> tuple[dict, dict]:
    cm, job = yaml.safe_load_all(text)
    return cm, job


def test_rayjob_has_required_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "job.yaml"
    res = CliRunner().invoke(app, [
        "render-job", "k8s", "build", "--config", TINY, "--input", "/data/in", "--output", "/data/out",
        "--image", "registry.example/cnc:1", "--nodes", "2", "--gpus-per-node", "4", "--pvc", "shared",
        "--secret", "hf-token", "--backoff-limit", "3", "--active-deadline", "7200", "--output-file", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert SECRET not in text
    cm, job = _docs(text)
    spec = _spec(output="/data/out")
    assert cm["kind"] == "ConfigMap" and yaml.safe_load(cm["data"]["config.yaml"]) == spec.config
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"] == RunSpec(kind="build", config=spec.config, input="/data/in",
                                              output="/data/out").run_id
    s = job["spec"]
    assert s["entrypoint"].startswith("python -u -m cnc.cli build --config /etc/cnc/config.yaml --input /data/in")
    assert yaml.safe_load(s["runtimeEnvYAML"]) == {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    assert s["shutdownAfterJobFinishes"] is True and s["backoffLimit"] == 3 and s["activeDeadlineSeconds"] == 7200
    head = s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    group = s["rayClusterSpec"]["workerGroupSpecs"][0]
    worker = group["template"]["spec"]
    assert group["replicas"] == 2 and group["rayStartParams"]["num-gpus"] == "4"
    c = worker["containers"][0]
    assert c["image"] == "registry.example/cnc:1" and c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert c["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    for pod in (head, worker):
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]
        assert {"name": "shared", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"]


def test_rayjob_checks_inputs():
    spec = _spec(output="/elsewhere/out")
    with pytest.raises(ConfigError, match="not on the shared volume"):
        render_k8s(spec, K8sOptions(image="img", pvc="shared"))
    with pytest.raises(ConfigError, match="--image"):
        render_k8s(spec, K8sOptions(image=""))
    with pytest.raises(ConfigError, match="credential"):
        render_k8s(spec, K8sOptions(image="img", env={"AWS_SECRET_ACCESS_KEY": "x"}))
    train = make_spec("train", TRAIN_TINY, output="s3://b/ckpt", input="s3://b/shards", workers=8)
    _, job = _docs(render_k8s(train, K8sOptions(image="img", nodes=1, gpus_per_node=8)))
    assert "--workers 8" in job["spec"]["entrypoint"] and "entrypointNumGpus" not in job["spec"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="--nodes"):
        render_slurm(_spec(), SlurmOptions(nodes=0))
    with pytest.raises(ConfigError, match="--port-base"):
        render_slurm(_spec(), SlurmOptions(port_base=80))

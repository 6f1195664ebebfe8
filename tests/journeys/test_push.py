"""``cnc push``: a build folder becomes a Hub dataset repo and an exported pipeline a model repo, with their cards; a
rerun uploads nothing new; the model repo loads with ``DiffusionPipeline.from_pretrained(repo, custom_pipeline=...,
trust_remote_code=True)``.

No Hub is reachable here: every call goes through the real ``huggingface_hub`` client (``create_repo``,
``upload_folder`` on its streamed resumable path, ``DatasetCard``/``ModelCard.push_to_hub``, ``snapshot_download``)
to the local stand-in :class:`tests.support.HubStandIn` on 127.0.0.1. Not exercised: LFS/Xet transfers (the stand-in
takes every file inline), authentication, the real Hub's validation rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support import REPO


def _cnc(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnc.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


@pytest.fixture
def hub_env(hub_server, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    return {**env, "HF_ENDPOINT": hub_server.endpoint, "HF_TOKEN": "hf_standin", "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_push_a_build_as_a_dataset_repo(tiny_shards, tmp_path, hub_server, hub_env):
    from huggingface_hub import DatasetCard

    build = tmp_path / "build"
    shutil.copytree(tiny_shards, build, ignore=shutil.ignore_patterns("_photos"))
    (build / "_cnc" / "inspect").mkdir()
    (build / "_cnc" / "inspect" / "index.html").write_text("<html></html>")  # a report: not part of the dataset
    (build / ".lock").write_text("")
    r = _cnc("push", str(build), "me/cnc-triplets", "--private", "--license", "cc-by-4.0", env=hub_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pushed" in r.stdout and "dataset repo me/cnc-triplets" in r.stdout
    repo = hub_server.repos[("dataset", "me/cnc-triplets")]
    local = {p.relative_to(build).as_posix(): p.read_bytes() for p in build.rglob("*") if p.is_file()}
    expected = {k for k in local if k != ".lock" and not k.startswith("_cnc/inspect/")}
    assert set(repo["files"]) == expected | {"README.md"} and repo["private"]
    assert all(repo["files"][k] == local[k] for k in expected)  # byte for byte
    card = DatasetCard(repo["files"]["README.md"].decode())
    assert card.data.license == "cc-by-4.0" and "webdataset" in card.data.tags
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "*.tar"}]}]
    assert "fg_depth.png" in card.text
    # resumable: a rerun finds every file in the repo (by hash) and commits none of them again
    before = len(repo["commits"])
    again = _cnc("push", str(build), "me/cnc-triplets", "--license", "cc-by-4.0", env=hub_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(c["paths"] in ([], ["README.md"]) for c in repo["commits"][before:]), repo["commits"][before:]


def test_push_an_export_as_a_model_repo_that_diffusers_loads(tmp_path, hub_server, hub_env):
    from huggingface_hub import ModelCard

    from cnc_model.card import write_pipeline_files
    from cnc_model.testing.tiny import tiny_cnc_pipeline

    export = tmp_path / "export"
    tiny_cnc_pipeline().save_pretrained(export)
    write_pipeline_files(export, "# CnC joint\n\ntiny", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "train_config.yaml").write_text("stage: joint\n")
    bad = _cnc("push", str(run), "me/x", env=hub_env)  # a run must be exported first: one line, exit 2
    assert bad.returncode == 2 and "export it first" in bad.stderr and "Traceback" not in bad.stderr
    r = _cnc("push", str(export), "me/cnc-joint", "--dataset", "me/cnc-triplets", env=hub_env)
    assert r.returncode == 0, r.stderr[-3000:]
    repo = hub_server.repos[("model", "me/cnc-joint")]
    assert {"model_index.json", "pipeline_cnc.py", "unet/config.json", "local_fuser/config.json", "README.md",
            "local_fuser/cnc_model.models.local_fuser.py"} <= set(repo["files"])  # + the components' entry points
    assert not (export / "local_fuser" / "cnc_model.models.local_fuser.py").exists()  # never written locally
    card = ModelCard(repo["files"]["README.md"].decode())
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.datasets == ["me/cnc-triplets"] and card.data.license == "creativeml-openrail-m"
    assert "compose-and-conquer" in card.data.tags and 'custom_pipeline="pipeline_cnc"' in card.text
    # the repo loads through diffusers' custom-pipeline loading, in a fresh interpreter, from the (stand-in) Hub
    code = ("from diffusers import DiffusionPipeline\n"
            "p = DiffusionPipeline.from_pretrained('me/cnc-joint', custom_pipeline='pipeline_cnc', "
            "trust_remote_code=True)\n"
            "print(type(p).__name__, type(p.local_fuser).__name__, type(p.global_fuser).__name__)\n"
            "from cnc_model.pipeline_cnc import CnCPipeline\n"
            "q = CnCPipeline.from_pretrained('me/cnc-joint', trust_remote_code=True)\n"
            "print(type(q.local_fuser).__name__)\n")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=hub_env, timeout=300,
                           cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.split() == ["CnCPipeline", "LocalFuser", "GlobalFuser", "LocalFuser"]
    assert ("GET", f"/me/cnc-joint/resolve/{repo['commits'][-1]['oid']}/pipeline_cnc.py") in hub_server.requests

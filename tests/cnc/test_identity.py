"""Model identities (issue 19): weight hashes cached per file, builds and training resumes refuse changed weights."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from cnc.identity import local_identity, model_identity
from cnc.tiny_store import materialize
from tests.support import FAST_BUILD, REPO, TINY_CONFIG, make_photo_folder, tiny_overrides, train_cli_app

BASE_KEY = "model.pretrained_model_name_or_path"


def test_weight_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("CNC_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    (folder / "config.json").write_text("{}")
    first = local_identity(folder)
    assert first.startswith("sha256:") and len(first) == 7 + 64
    assert (tmp_path / "cache" / "weight-hashes.json").is_file()

    # same path, size and mtime: the cached hash is used, the file is not read again (new bytes go unnoticed)
    st = weights.stat()
    weights.write_bytes(b"b" * 4096)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert local_identity(folder) == first
    # a new modification time invalidates the entry: the new bytes give a new identity
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = local_identity(folder)
    assert second != first
    # non-weight files are not part of the identity
    (folder / "config.json").write_text('{"x": 1}')
    assert local_identity(folder) == second
    # a hub cache snapshot folder is identified by its commit
    snap = tmp_path / "models--org--m" / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    assert model_identity("org/m", str(snap)) == {"id": "org/m", "revision": "c" * 40, "identity": "hub:" + "c" * 40}


@pytest.mark.ray
def test_swapped_weights_refuse_a_resume_unless_allowed(ray_local, tmp_path):
    from pipelines.build import build_entry

    depth = tmp_path / "dpt"
    shutil.copytree(materialize("depth", 0), depth)
    photos = tmp_path / "in"
    make_photo_folder(photos, 3, bad=())
    out = tmp_path / "out"
    sets = [*FAST_BUILD, f"depth.model={depth}", "max_failure_fraction=1.0"]
    assert build_entry(str(TINY_CONFIG), str(photos), str(out), sets, summary=False) == 0
    manifest = json.loads((out / "_cnc" / "manifest.json").read_text())
    old = manifest["models"]["depth.model"]["identity"]
    assert old == local_identity(depth) and manifest["models"]["inpaint.model"]["identity"].startswith("sha256:")
    marker = json.loads(next(out.glob("_cnc/*_stats.json")).read_text())
    assert marker["models"]["depth.model"]["identity"] == old

    shutil.copy(materialize("depth", 1) / "model.safetensors", depth / "model.safetensors")  # new weights, same path
    new = local_identity(depth)
    assert new != old
    cmd = [sys.executable, "-m", "cnc.cli", "build", "--config", str(TINY_CONFIG), "--input", str(photos),
           "--output", str(out), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "depth.model" in ln]
    assert len(lines) == 1 and old in lines[0] and new in lines[0] and "--allow-model-change" in lines[0]
    assert "Traceback" not in proc.stderr

    assert build_entry(str(TINY_CONFIG), str(photos), str(out), sets, summary=False, allow_model_change=True) == 0
    plan = json.loads((out / "_cnc" / "plan.json").read_text())
    assert plan["models"]["depth.model"]["identity"] == new
    manifest = json.loads((out / "_cnc" / "manifest.json").read_text())
    change = manifest["model_changes"]["resumes"][-1]
    assert change["before"]["depth.model"]["identity"] == old and change["after"]["depth.model"]["identity"] == new
    # the new identity is now the plan's: the same weights resume without the option
    assert build_entry(str(TINY_CONFIG), str(photos), str(out), sets, summary=False) == 0


def test_training_resume_with_a_changed_base_model_is_refused(tiny_shards, tmp_path):
    from typer.testing import CliRunner

    base = tmp_path / "sd"
    shutil.copytree(materialize("sd", 0), base)
    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs/train/tiny.yaml")]
    for item in tiny_overrides(tiny_shards, out, "train.max_train_steps=1", "train.checkpointing_steps=1",
                               f"{BASE_KEY}={base}"):
        args += ["--set", item]
    result = CliRunner().invoke(train_cli_app(), args)
    assert result.exit_code == 0, result.output
    prov = yaml.safe_load((out / "train_config.yaml").read_text())["provenance"]
    old = prov["models"][BASE_KEY]["identity"]
    manifest_sha = hashlib.sha256((tiny_shards / "_cnc" / "manifest.json").read_bytes()).hexdigest()
    assert old == local_identity(base) and prov["shard_manifests"] == {str(tiny_shards): manifest_sha}
    assert json.loads((out / "checkpoint-1" / "provenance.json").read_text())["models"][BASE_KEY]["identity"] == old

    unet = "unet/diffusion_pytorch_model.safetensors"
    shutil.copy(materialize("sd", 1) / unet, base / unet)
    result = CliRunner().invoke(train_cli_app(), args + ["--set", "train.max_train_steps=2", "--resume", "latest"])
    assert result.exit_code == 2
    assert BASE_KEY in result.output and old in result.output and local_identity(base) in result.output

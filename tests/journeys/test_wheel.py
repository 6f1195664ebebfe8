"""A wheel of the project installs and runs without the checkout (issue 18): help, a tiny build, a tiny training.

The wheel is built from a copy of the sources (no build isolation, so no network) and installed with ``--no-deps
--target`` into a temporary folder; the commands then run from another folder with only that folder on
``PYTHONPATH``, the dependencies coming from the current environment (whose editable ``cnc`` finder comes after
``PYTHONPATH`` on the import path, which the test checks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, make_photo_folder

SOURCES = ("cnc", "triplets", "pipelines", "cnc_model", "jobs", "pyproject.toml", "README.md")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL")}
    env["PIP_NO_INDEX"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(root / "dist"), str(src)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here without network: {proc.stderr.strip().splitlines()[-1:]}")
    wheel = next((root / "dist").glob("cnc-*.whl"))
    target = root / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
          str(wheel)], root, env)
    env["PYTHONPATH"] = str(target)
    env["PATH"] = f"{target / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return target, env


@pytest.mark.slow
def test_the_installed_wheel_builds_and_trains_outside_the_checkout(installed, tmp_path):
    target, env = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([sys.executable, "-c", "import cnc, cnc.config as c; print(cnc.__file__); "
                  "print(c.packaged_config_names())"], work, env).stdout.splitlines()
    assert where[0].startswith(str(target)) and "train/tiny" in where[1]  # the wheel's package, not the checkout
    cnc = str(target / "bin" / "cnc")
    assert "models" in _run([cnc, "--help"], work, env).stdout
    assert "stage: local" in _run([cnc, "config", "show", "train/tiny"], work, env).stdout

    make_photo_folder(work / "photos", 2, bad=())
    fast = ["resolution=64", "min_side=32", "inpaint.num_inference_steps=1", "ray.num_workers=1",
            "max_failure_fraction=1.0"]
    cmd = [cnc, "build", "--config", "tiny", "--input", "photos", "--output", "shards", "--no-progress"]
    for s in fast:
        cmd += ["--set", s]
    _run(cmd, work, env, timeout=400)
    assert json.loads((work / "shards" / "_cnc" / "manifest.json").read_text())["totals"]["shards_committed"] == 1

    train = [cnc, "train", "--config", "train/tiny"]
    for s in ("data.train_shards=shards", "output_dir=run", "train.max_train_steps=1", "train.checkpointing_steps=1",
              "validation.num_samples=0", "train.progress_bar=false", "train.report_to=none",
              "data.preflight_shards=1"):
        train += ["--set", s]
    _run(train, work, env, timeout=400)
    assert (work / "run" / "local_fuser" / "config.json").is_file()

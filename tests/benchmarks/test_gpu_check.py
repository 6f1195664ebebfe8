"""``benchmarks/gpu_check.sh`` (``make gpu-check``) on the CPU: carried wheels installed into a private folder, every
phase run with tiny models, one summary.json + summary.md that the phases' own numbers add up to; a partial run
still summarises."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel of a made-up distribution (stands for a package the GPU image lacks)."""
    folder.mkdir(parents=True)
    path = folder / "cnc_gpu_check_probe-0.1-py3-none-any.whl"
    info = "cnc_gpu_check_probe-0.1.dist-info"
    files = {"cnc_gpu_check_probe/__init__.py": "__version__ = '0.1'\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: cnc_gpu_check_probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gpu-check")
    _probe_wheel(tmp / "whl")
    (tmp / "wheels.txt").write_text("# test list\ncnc_gpu_check_probe==0.1 cnc_gpu_check_probe\n")
    out = tmp / "out"
    env = {**os.environ, "CPU_SMOKE": "1", "PYTHON": os.environ.get("PYTHON_FOR_GPU_CHECK", _python()),
           "OUT": str(out), "WHL": str(tmp / "whl"), "WHEELS": str(tmp / "wheels.txt"), "SITE": str(tmp / "site"),
           "VARIANTS": "stock-pndm+host-inline", "TOTAL_S": "400"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def _python() -> str:
    import sys

    return sys.executable


def test_wheels_install_into_the_private_folder_and_imports_are_checked(smoke):
    env = json.loads((smoke / "env.json").read_text())
    probe = env["modules"]["cnc_gpu_check_probe"]
    assert probe["ok"] and str(smoke.parent / "site") in probe["file"]  # installed there, not into the interpreter
    assert env["required_failed"] == [] and all(
        env["modules"][m]["ok"] for m in ("triplets.builder", "cnc_model.training.trainer", "torch"))
    assert str(REPO) in env["pythonpath"]  # the source tree, not an installed copy
    assert "cnc_gpu_check_probe==0.1" in (smoke / "log.txt").read_text()


def test_every_phase_runs_and_the_summary_adds_up(smoke):
    s = json.loads((smoke / "summary.json").read_text())
    build = s["build"]
    runs = build["runs"]
    assert [r["run"].split(":")[0] for r in runs] == ["reference", "project", "variant stock-pndm+host-inline"]
    assert build["same_work_in_every_run"] and not build["partial"] and not build["failed_variants"]
    flops = build["flops"]
    assert flops["flop_per_triplet"] == pytest.approx(sum(r["flop_per_triplet"] for r in flops["rows"]))
    assert build["flop_per_triplet_T"] * 1e12 == pytest.approx(flops["flop_per_triplet"])
    for r in runs:  # MFU = triplets/s × counted FLOP per triplet / measured peak
        assert r["mfu"] == pytest.approx(r["triplets_per_s"] * flops["flop_per_triplet"] /
                                         (build["matmul_peak_T"] * 1e12), rel=1e-2, abs=1e-4)
    assert runs[0]["ratio"] == 1.0 and build["batch_choice"]["shipped"] == 4
    assert {r["setting"] for r in s["train"]} == {"project", "reference"}
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in s["train"])
    assert s["micro"]["unet"]["runs"] and s["micro"]["sam"]["runs"] and s["loader"]
    md = (smoke / "summary.md").read_text()
    assert "## Build (complete" in md and "## Trainer" in md and "| inpaint | UNet (" in md
    assert "## Goals (issue 29)" in md


def test_a_partial_run_still_summarises(smoke, tmp_path):
    """A run stopped after the suite's first run: the summary is written from what exists, marked partial."""
    out = tmp_path / "stopped"
    out.mkdir()
    suite = json.loads((smoke / "gpu_suite.json").read_text())
    (out / "gpu_suite.json").write_text(json.dumps({"partial": True, **{k: suite[k] for k in (
        "flop_per_triplet", "matmul_peak_flops", "flops")}, "runs": suite["runs"][:1]}))
    shutil.copy(smoke / "env.json", out / "env.json")
    proc = subprocess.run([_python(), str(REPO / "benchmarks" / "gpu_summary.py"), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["build"]["partial"] and len(s["build"]["runs"]) == 1 and "train" not in s
    assert "## Build (partial" in (out / "summary.md").read_text()

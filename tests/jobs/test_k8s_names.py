"""Issue 11.10: k8s --pvc / --secret / --namespace values are validated as Kubernetes names (exit 2, one line)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cnc.config import ConfigError
from jobs.render_k8s import K8sOptions, check_k8s_name
from tests.support import REPO

TINY = str(REPO / "configs" / "build" / "tiny.yaml")


@pytest.mark.parametrize("value", ["Shared", "my_pvc", "-x", "x-", "a b", "", "x" * 254, "pvc\nkind: Secret",
                                   "../etc", "ümlaut"])
def test_bad_pvc_and_secret_names_are_refused(value):
    for option in ("--pvc", "--secret"):
        with pytest.raises(ConfigError, match=f"{option} .* is not a valid Kubernetes name"):
            check_k8s_name(option, value)


@pytest.mark.parametrize("value", ["shared", "hf-token", "a.b-c", "x" * 253])
def test_good_names_pass(value):
    check_k8s_name("--pvc", value)


def test_namespace_is_a_label():
    check_k8s_name("--namespace", "team-a", label=True)
    with pytest.raises(ConfigError):
        check_k8s_name("--namespace", "team.a", label=True)


def test_options_check_names_everywhere():
    from jobs.run import RunSpec

    spec = RunSpec(kind="build", config={}, input="/data/in", output="/data/out")
    with pytest.raises(ConfigError, match="--secret"):
        K8sOptions(image="img", secrets=["ok", "Not_OK"]).check(spec)
    with pytest.raises(ConfigError, match="--pvc"):
        K8sOptions(image="img", pvc="Bad Name").check(spec)


def test_cli_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", "render-job", "k8s", "build", "--config", TINY,
                           "--input", "/data/in", "--output", "/data/out", "--image", "img", "--pvc", "Shared_PVC"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "--pvc 'Shared_PVC' is not a valid Kubernetes name" in proc.stderr

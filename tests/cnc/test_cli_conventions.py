"""Issue 13.3: one set of option names across every ``cnc`` command, --version, completion, inspect --json,
progress lines off a terminal, third-party warnings in the log, tracker extras, no output before validation."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys

import pytest
import typer

from cnc.cli import app
from tests.support import REPO


def _commands(cmd, path: str = "cnc"):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, f"{path} {name}")


def _cnc(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnc.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def test_every_command_uses_the_same_option_names():
    root = typer.main.get_command(app)
    seen = 0
    for path, cmd in _commands(root):
        for p in cmd.params:
            if getattr(p, "param_type_name", None) != "option":  # typer may vendor click: no isinstance
                continue
            names = set(p.opts) | set(p.secondary_opts)
            if "-o" in names:  # -o means one thing: the output location
                assert "--output" in names, (path, p.opts)
            if "--output" in names:
                assert "-o" in names, (path, p.opts)
                seen += 1
            for old in ("--out", "--ray-workers", "--ray-address", "--num-images", "--image-encoder",
                        "--num-processes"):
                if old in names:
                    assert p.hidden, f"{path}: {old} must be a hidden deprecated alias"
            for name in names:
                assert not name.startswith("--") or name == name.lower(), (path, name)
            if "--n" in names:  # the count of samples or images is --n/-n everywhere
                assert "-n" in names, (path, p.opts)
    assert seen >= 6  # build, inspect, sample, train, submit, render-job
    visible = {path: {o for p in cmd.params if not getattr(p, "hidden", False) for o in p.opts}
               for path, cmd in _commands(root)}
    for path in ("cnc build", "cnc inspect", "cnc train", "cnc eval", "cnc submit", "cnc render-job"):
        assert "--workers" in visible[path], path  # parallel workers: one name in every command that has them
    for path in ("cnc inspect", "cnc sample", "cnc eval"):
        assert "--n" in visible[path], path
    for path in ("cnc sample", "cnc eval"):
        assert "--clip-model" in visible[path], path
    for path in ("cnc build", "cnc score", "cnc train", "cnc submit", "cnc render-job"):
        assert {"--config", "--set"} <= visible[path], path
    assert "--output" in visible["cnc convert-reference"]


def test_errors_blame_the_option_the_override_or_the_file(tmp_path):
    from cnc.config import ConfigError, load_config
    from triplets.config import BuildConfig

    cfg = tmp_path / "mine.yaml"
    cfg.write_text("samples_per_shard: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(BuildConfig, cfg, ["input_format=bogus", "ray.num_workers=-1"], options={"ray.num_workers": "--workers"})
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"invalid config {cfg}: samples_per_shard: ")
    assert lines[1].startswith("invalid --set input_format=bogus: input_format: Input should be 'auto', 'folder'")
    assert lines[2].startswith("invalid --workers -1: ray.num_workers: ")
    # fixed choices are enums: the command line refuses them itself, naming the option
    r = _cnc("build", "-c", "tiny", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--input-format", "bogus")
    assert r.returncode == 2 and "Invalid value for '--input-format'" in r.stderr and "invalid config" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_build_workers_sets_the_config_worker_count(tmp_path):
    import yaml

    photos = tmp_path / "photos"
    from tests.support import make_photo_folder

    make_photo_folder(photos, 2, bad=())
    r = _cnc("build", "-c", "tiny", "-i", str(photos), "-o", str(tmp_path / "out"), "--workers", "3", "--plan-only")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "out" / "_cnc" / "config.yaml").read_text())
    assert saved["ray"]["num_workers"] == 3


def test_version_completion_and_help():
    v = _cnc("--version")
    assert v.returncode == 0 and v.stdout.startswith("cnc ") and len(v.stdout.split()) == 2
    h = _cnc("--help")
    assert "--install-completion" in h.stdout and "--version" in h.stdout
    # the shell is detected from the parent processes: run it under bash, as a user's terminal would
    s = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -m cnc.cli --show-completion; exit $?"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert s.returncode == 0 and "complete -o default -F" in s.stdout, s.stderr


def test_inspect_json_and_card(tiny_shards, tmp_path):
    shutil = pytest.importorskip("shutil")
    folder = tmp_path / "build"
    shutil.copytree(tiny_shards, folder, ignore=shutil.ignore_patterns("_photos"))
    (folder / "_cnc" / "README.md").unlink()
    r = _cnc("inspect", str(folder), "-n", "0", "--json", "--card")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)  # stdout holds exactly one JSON document
    assert doc["ok"] and doc["samples"] == 6 and doc["shards"] == 2 and doc["shown"] == []
    assert doc["problem_count"] == 0, doc["problems"]  # markers found under _cnc/
    assert (folder / "_cnc" / "README.md").is_file() and str(folder / "_cnc" / "README.md") in doc["files"]
    assert "Shards" in r.stderr  # the human tables went to stderr
    old = _cnc("inspect", str(folder), "--n", "1", "--out", str(tmp_path / "rep"))
    assert old.returncode == 0 and "--out is deprecated; use --output" in old.stderr
    assert (tmp_path / "rep" / "summary.json").is_file()


def test_step_progress_logs_lines_off_a_terminal(caplog):
    from cnc.progress import StepProgress

    now = [0.0]
    p = StepProgress(100, desc="train local", tty=False, interval_s=10, every_steps=None, samples_per_step=4,
                     clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="cnc.progress"):
        for _ in range(30):
            now[0] += 1.0
            p.update(1, loss=0.25, lr=1e-4)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "\r" not in "".join(lines)  # at 10 s, 20 s, 30 s
    assert lines[0].startswith("train local: step 10/100 (10.0%) loss 0.2500 lr 1.00e-04 4.00 samples/s ETA 0:01:30")


def test_third_party_warnings_are_routed_and_demoted(caplog):
    from cnc.logs import setup_logging

    setup_logging("INFO")
    with caplog.at_level(logging.INFO):
        logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
            "Token authentication is disabled for this Ray cluster. Anyone with network access...")
        logging.getLogger("transformers.modeling_utils").warning("`torch_dtype` is deprecated! Use `dtype` instead!")
        logging.getLogger("transformers.modeling_utils").warning("something that matters")
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert msgs == [("WARNING", "something that matters")]


def test_report_to_accepts_accelerate_trackers_and_names_missing_packages(monkeypatch):
    import importlib.util

    from cnc.base.errors import UserError
    from cnc_model.training.config import TrainLoopConfig, check_tracker

    for name in ("tensorboard", "wandb", "mlflow", "none"):
        assert TrainLoopConfig(report_to=name).report_to == name
    check_tracker("tensorboard")
    check_tracker("none")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(UserError, match=r"report_to=wandb needs the 'wandb' package.*cnc\[wandb\].*report_to=none"):
        check_tracker("wandb")


def test_train_with_a_wrong_shard_path_creates_no_output(tmp_path):
    out = tmp_path / "run"
    r = _cnc("train", "-c", str(REPO / "configs/train/tiny.yaml"), "--set", f"data.train_shards={tmp_path}/nope",
             "-o", str(out), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "nope" in r.stderr
    assert not out.exists()


def test_render_job_rejects_the_old_meaning_of_o(tmp_path):
    r = _cnc("render-job", "slurm", "build", "--config", str(REPO / "configs/build/tiny.yaml"), "--input", "/in",
             "-o", str(tmp_path / "job.sbatch"))
    assert r.returncode == 2 and "--output-file" in r.stderr and not (tmp_path / "job.sbatch").exists()

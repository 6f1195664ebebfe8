"""The user journey through the CLI in fresh processes: shards -> train local, global, joint (with EMA) -> sample each
output (run folders and a checkpoint) -> export -> from_pretrained in a fresh interpreter -> cnc eval (twice: in one
and in two processes, same numbers).

Everything is tiny (seeded random models, 64 px, 2 training steps, 2 sampling steps); the shards come from the
session's ``tiny_shards`` fixture (a real tiny build).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO

FAST_TRAIN = ["--set", "train.max_train_steps=2", "--set", "validation.num_samples=0", "--set",
              "train.progress_bar=false", "--set", "train.report_to=none", "--set", "data.preflight_shards=0"]


def _cnc(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    if check:
        assert proc.returncode == 0, f"cnc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        assert "\r" not in proc.stderr, f"cnc {args[0]}: a progress bar in a piped log:\n{proc.stderr[-2000:]}"
    return proc


def _cnc_all(*calls: tuple[tuple[str, ...], dict]) -> list[subprocess.CompletedProcess]:
    """Independent ``cnc`` commands ``(args, env)`` at once (fresh processes each; most of a tiny command is its
    single-threaded start-up), each checked like :func:`_cnc`."""
    procs = [subprocess.Popen([sys.executable, "-m", "cnc.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=REPO) for args, env in calls]
    done = []
    for (args, _), proc in zip(calls, procs):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"cnc {' '.join(args)} failed:\n{stdout}\n{stderr}"
        assert "\r" not in stderr, f"cnc {args[0]}: a progress bar in a piped log:\n{stderr[-2000:]}"  # issue 28
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


@pytest.fixture(scope="module")
def env(tiny_metrics_cache) -> dict:
    return {**os.environ, "CNC_CACHE_DIR": str(tiny_metrics_cache), "HF_HUB_OFFLINE": "1"}


def test_train_sample_export_evaluate(tiny_shards, tmp_path, env):
    runs = tmp_path / "runs"
    tar = sorted(tiny_shards.glob("*.tar"))[0]
    from cnc_model.data import first_samples

    key = first_samples([str(tar)], 1)[0].key
    # 1. train the three stages (joint starts from the two earlier runs)
    base = ["train", "--config", "configs/train/tiny.yaml", "--set", f"data.train_shards={tiny_shards}", *FAST_TRAIN]
    _cnc_all(((*base, "--set", f"output_dir={runs / 'local'}"), env),
             ((*base, "--set", "stage=global", "--set", f"output_dir={runs / 'global'}"), env))
    _cnc(*base, "--set", "stage=joint", "--set", f"output_dir={runs / 'joint'}", "--set",
         f"model.local_fuser={runs / 'local'}", "--set", f"model.global_fuser={runs / 'global'}", "--set",
         "train.checkpointing_steps=1", "--set", "train.use_ema=true", env=env)
    import torch

    from cnc_model.loading import load_pipeline

    for stage, fusers in (("local", (True, False)), ("global", (False, True)), ("joint", (True, True))):
        pipe = load_pipeline(runs / stage)  # a stage samples with exactly the fusers it trained
        assert (pipe.local_fuser is not None, pipe.global_fuser is not None) == fusers, stage
    # a checkpoint loads its EMA copies by default (the final fusers of an EMA run are EMA weights), raw on request
    final, ema, raw = (load_pipeline(runs / "joint" / f, weights=w) for f, w in
                       (("", None), ("checkpoint-2", None), ("checkpoint-2", "raw")))
    for name in ("local_fuser", "global_fuser"):
        f, e, r = (getattr(p, name).state_dict() for p in (final, ema, raw))
        assert all(torch.equal(f[k], e[k]) for k in f), name
        assert any(not torch.equal(e[k], r[k]) for k in e), name

    # 2. sample run folders and a checkpoint folder alike (and, at the same time, export a checkpoint: step 3)
    sources = (runs / "local", runs / "global", runs / "joint" / "checkpoint-1")
    export = tmp_path / "exported"
    _cnc_all(*[(("sample", str(source), "--shard-sample", f"{tar}#{key}", "--steps", "2", "--height", "64", "--width",
                 "64", "--output", str(tmp_path / "samples" / source.name)), env) for source in sources],
             (("export", str(runs / "joint" / "checkpoint-1"), "--output", str(export)), env))
    for source in sources:
        out = tmp_path / "samples" / source.name
        assert (out / "sample_0.png").is_file() and (out / "sheet.png").is_file()
    from typer.testing import CliRunner

    from cnc.cli import app

    for bad in (tmp_path / "nowhere", runs / "joint" / "local_fuser", tiny_shards):
        result = CliRunner().invoke(app, ["sample", str(bad), "--shard-sample", f"{tar}#{key}"])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    for bad, weights, why in ((runs / "local" / "checkpoint-2", "ema", "no EMA weights"),
                              (runs / "joint", "raw", "checkpoint-N")):
        result = CliRunner().invoke(app, ["export", str(bad), "--weights", weights, "--output", str(tmp_path / "x")])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert why in result.output, result.output
    result = CliRunner().invoke(app, ["export", str(runs / "joint"), "--weights", "last", "--output", "x"])
    assert result.exit_code == 2 and "Invalid value for '--weights'" in result.output, result.output  # an enum
    assert "'last' is not one of 'ema'," in result.output, result.output

    # 3. the exported checkpoint: a fresh interpreter loads it with exactly the stage's fusers
    card = (export / "local_fuser" / "README.md").read_text()
    assert "stage `joint`" in card and str(tiny_shards) in card and "steps: 1" in card and "weights: ema" in card
    assert "## Conditions" in card and "- `depth.preprocess`: processor" in card  # the training shards' settings
    assert json.loads((export / "cnc_export.json").read_text())["weights"] == "ema"
    code = ("from cnc_model.pipeline_cnc import CnCPipeline\n"
            f"a = CnCPipeline.from_pretrained({str(export)!r})\n"
            "print(type(a.local_fuser).__name__, type(a.global_fuser).__name__)\n"
            "from diffusers import DiffusionPipeline\n"  # diffusers' documented custom-pipeline loading
            f"b = DiffusionPipeline.from_pretrained({str(export)!r}, custom_pipeline='pipeline_cnc', "
            "trust_remote_code=True)\n"
            "print(type(b).__name__, all((x == y).all() for x, y in zip(a.unet.parameters(), b.unet.parameters())))\n")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.split() == ["LocalFuser", "GlobalFuser", "CnCPipeline", "True"]
    from huggingface_hub import ModelCard

    card = ModelCard.load(export / "README.md")  # Hub metadata on the export's card
    assert (card.data.library_name, card.data.pipeline_tag) == ("diffusers", "text-to-image")
    assert card.data.base_model is None  # the tiny base is no hub id; a hub id base is named (tests/cnc_model)

    # 4. evaluate the joint run against the exported checkpoint (one process); evaluating the joint run alone in two
    #    processes (gloo; batches [0, 1] and [2]) gives the same images and the same metrics.json: deterministic, and
    #    a model's scores depend neither on what it is compared with nor on the number of processes. One thread per
    #    process in both (FID of 3 images is ill-conditioned: thread-dependent rounding would show).
    one_thread = {**env, "OMP_NUM_THREADS": "1"}
    common = ["--shards", str(tiny_shards), "--n", "3", "--steps", "1", "--batch-size", "2", "--metrics-models", "tiny",
              "--device", "cpu"]
    out, alone = tmp_path / "eval-compare", tmp_path / "eval-alone"
    proc, proc_alone = _cnc_all(
        (("eval", str(runs / "joint"), "--compare", str(export), "--output", str(out), *common), one_thread),
        (("eval", str(runs / "joint"), "--output", str(alone), "--workers", "2", *common), one_thread))
    assert "| fid ↓ |" in proc.stdout and "| weights | ema | ema |" in proc.stdout
    assert (out / "grid.png").is_file() and (out / "metrics.md").is_file()
    report = json.loads((out / "metrics.json").read_text())
    assert report["n"] == 3 and set(report["models"]) == {"joint", "exported"}
    for key in ("fid", "inception_score", "clip_score", "ssim", "lpips", "depth_mae", "region_fg_margin"):
        assert isinstance(report[key], float), key
    assert report["weights"] == "ema" and report["models"]["exported"]["weights"] == "ema"
    # the evaluation shards' build settings are checked against the training shards' (the same build here), also
    # through the export, which carries the run's record
    for block in report["models"].values():
        assert block["conditions"]["trained_known"] and block["conditions"]["differences"] == [], block
    assert "built with the training shards' settings" in proc.stderr
    assert "process 1/2: 1 of 2 batches" in proc_alone.stderr, proc_alone.stderr[-3000:]
    again = json.loads((alone / "metrics.json").read_text())
    assert again.pop("model") == "joint"
    assert again == {k: v for k, v in report.items() if k != "models"}
    images = sorted(p.name for p in (out / "images" / "joint").glob("*.png"))
    assert len(images) == 3 and images == sorted(p.name for p in (alone / "images" / "joint").glob("*.png"))
    assert all((out / "images" / "joint" / n).read_bytes() == (alone / "images" / "joint" / n).read_bytes()
               for n in images)
    assert report["models"]["joint"] != report["models"]["exported"]  # step 2 vs step 1 weights
    # the grid names each model over its column; TensorBoard (the default tracker, as cnc train) holds the metrics
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from triplets.inspect.grid import grid_geometry

    g = grid_geometry(["I (held out)", "fg depth", "bg depth", "mask M", "joint", "exported"], 3, 64, footer="x")
    assert Image.open(out / "grid.png").size == g.size
    events = EventAccumulator(str(out / "logs" / "cnc-eval"))
    events.Reload()
    for label, step in (("joint", 2), ("exported", 1)):
        (scalar,) = events.Scalars(f"eval/{label}/fid")
        assert scalar.step == step and scalar.value == pytest.approx(report["models"][label]["fid"], rel=1e-5)
    # 5. resume: a rerun (one process) reuses the two-process run's images and recomputes the same metrics
    stamps = {p: p.stat().st_mtime_ns for p in (alone / "images" / "joint").glob("*.png")}
    (alone / "metrics.json").unlink()
    rerun = _cnc("eval", str(runs / "joint"), "--output", str(alone), "--workers", "1", *common, env=one_thread)
    assert "joint: reusing 3 of 3 generated images" in rerun.stderr, rerun.stderr[-3000:]
    assert json.loads((alone / "metrics.json").read_text()) == {**again, "model": "joint"}
    assert {p: p.stat().st_mtime_ns for p in (alone / "images" / "joint").glob("*.png")} == stamps

"""Object storage end to end, through the CLI in fresh processes, against a real S3 server (moto) on 127.0.0.1.

Build to ``s3://`` (exactly once under a driver SIGKILL, byte-identical reruns, the same samples as a local build),
refuse a second concurrent build, refuse unknown and malformed URLs in one line, inspect on ``s3://``; the working
directory stays empty throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import FAST_BUILD, TINY_CONFIG, start_driver
from triplets.sample import decode_sample
from triplets.shardio import TarStream

pytestmark = pytest.mark.ray
BUILD_SETS = FAST_BUILD + ["max_failure_fraction=0.5"]


def cnc(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "cnc.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def build_args(src, out, *extra: str) -> list[str]:
    return ["build", "--config", str(TINY_CONFIG), "--input", str(src), "--output", str(out), "--no-progress",
            *[a for o in BUILD_SETS + list(extra) for a in ("--set", o)]]


def s3fs():
    import s3fs as _s3fs

    _s3fs.S3FileSystem.clear_instance_cache()
    return _s3fs.S3FileSystem()


def listing(prefix: str) -> dict[str, bytes]:
    """Every object below ``s3://prefix`` (relative name → bytes)."""
    fs = s3fs()
    bucket_path = prefix.removeprefix("s3://")
    out = {}
    for p in fs.find(bucket_path + "/"):
        try:
            out[p[len(bucket_path) + 1:]] = fs.cat_file(p)
        except FileNotFoundError:  # deleted between the listing and the read (a recovering build)
            continue
    return out


def samples_of(objects: dict[str, bytes]) -> dict[str, dict]:
    """key → raw sample (json's source removed) over every tar among ``objects``."""
    import tempfile

    out = {}
    for name, data in sorted(objects.items()):
        if not name.endswith(".tar"):
            continue
        with tempfile.NamedTemporaryFile(suffix=".tar") as f:
            f.write(data)
            f.flush()
            for raw in TarStream(f.name).samples():
                meta = json.loads(raw["json"])
                meta.pop("source")
                out[raw["__key__"]] = {**raw, "json": meta}
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The working directory of every command here: it must stay empty."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def local_reference(reference_build):
    """The local build of the same photos with the same config (``conftest.reference_build``)."""
    return reference_build[0]


def test_s3_build_is_exactly_once_under_sigkill_and_byte_identical(s3_server, photo_folder, local_reference,
                                                                   workdir, tmp_path):
    local_src, photos = photo_folder
    bucket = s3_server.bucket("cnc-builds")
    killed, clean, src = f"{bucket}/killed", f"{bucket}/clean", f"{bucket}/photos"
    s3fs().put(str(local_src), src.removeprefix("s3://"), recursive=True)  # the input lives in the bucket too
    # 1. a build whose driver is SIGKILLed after its first committed shard
    env = dict(os.environ, CNC_TEST_FAULT_INJECTION=json.dumps({"batch_delay_s": 0.7}))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "cnc.cli", *build_args(src, killed, "ray.num_workers=1")]
    proc = start_driver(cmd, tmp_path / "driver.log", lambda: any(n.endswith("_stats.json") for n in listing(killed)),
                        cwd=workdir, env=env)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    after_kill = listing(killed)
    markers = [n for n in after_kill if n.endswith("_stats.json")]
    assert 1 <= len(markers) < 4, "the build finished before the kill"
    for name in after_kill:  # no partial object: every visible tar reads to its end
        if name.endswith(".tar"):
            assert samples_of({name: after_kill[name]})
    # 2. rerun: resumes, every sample exactly once; 3. at the same time, a clean s3 build of the same input
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        proc, clean_proc = pool.map(lambda out: cnc(build_args(src, out), workdir), (killed, clean))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = listing(killed)
    keys = [k for k in samples_of(resumed)]
    assert sorted(keys) == sorted(photos["good"])
    errs = [json.loads(line)["key"] for n, d in resumed.items() if n.startswith("_cnc/errors/")
            for line in d.decode().splitlines()]
    assert sorted(errs) == sorted(photos["bad"])
    assert not [n for n in resumed if n.endswith(".tmp")] and ".lock" not in resumed
    assert {"_cnc/plan.json", "_cnc/config.yaml", "_cnc/manifest.json", "_cnc/README.md",
            ".huggingface.yaml"} <= set(resumed)
    # 3. the clean s3 build: byte-identical tars; the same samples as the local build
    assert clean_proc.returncode == 0, clean_proc.stderr[-3000:]
    clean_objects = listing(clean)
    sha = {n: hashlib.sha256(d).hexdigest() for n, d in clean_objects.items() if n.endswith(".tar")}
    assert sha == {n: hashlib.sha256(d).hexdigest() for n, d in resumed.items() if n.endswith(".tar")}
    local = {p.name: p.read_bytes() for p in local_reference.glob("*.tar")}
    assert samples_of(clean_objects) == samples_of(local)  # same keys and payloads; only the source differs
    first = json.loads(next(iter(TarStream(f"{clean}/000000.tar").samples()))["json"])
    assert first["source"].startswith(f"{src}/")
    manifest = json.loads(clean_objects["_cnc/manifest.json"])
    assert [s["url"] for s in manifest["shardlist"]] == sorted(sha)
    assert not list(workdir.iterdir()), "nothing may be written into the working directory"
    # 4. decoded samples equal the local build's field by field (uint16 depth included)
    local_sample = decode_sample(next(iter(TarStream(str(local_reference / "000000.tar")).samples())))
    assert local_sample.fg_depth.dtype.name == "uint16"


def test_second_concurrent_build_on_one_prefix_is_refused(s3_server, photo_folder, workdir, tmp_path):
    src, _ = photo_folder
    out = f"{s3_server.bucket('cnc-builds')}/concurrent"
    env = dict(os.environ, CNC_TEST_FAULT_INJECTION=json.dumps({"batch_delay_s": 1.0}))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "cnc.cli", *build_args(src, out, "ray.num_workers=1")]
    first = start_driver(cmd, tmp_path / "first.log", lambda: ".lock" in listing(out), cwd=workdir, env=env)
    try:
        second = cnc(build_args(src, out), workdir)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "another `cnc build` holds" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    assert first.returncode == 128 + signal.SIGTERM, (tmp_path / "first.log").read_text()[-2000:]
    assert "interrupted by SIGTERM" in (tmp_path / "first.log").read_text()
    assert ".lock" not in listing(out)  # released on the way out
    assert not list(workdir.iterdir())


@pytest.mark.parametrize("url, expected", [
    ("zzz://bucket/run", "unknown URL scheme zzz://"),
    ("s3:/bucket/run", "looks like a URL but is malformed"),
])
def test_unknown_or_malformed_output_url_is_refused_in_one_line(photo_folder, workdir, url, expected):
    src, _ = photo_folder
    proc = cnc(build_args(src, url), workdir, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not list(workdir.iterdir()), "never turned into a local folder"


def test_inspect_on_s3(s3_server, local_reference, workdir, tmp_path):
    out = f"{s3_server.bucket('cnc-builds')}/inspected"
    s3fs().put(str(local_reference), out.removeprefix("s3://"), recursive=True)  # a finished build, in the bucket
    report = tmp_path / "report"
    proc = cnc(["inspect", out, "--n", "2", "--output", str(report)], workdir, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert list(report.glob("*.png"))
    fs = s3fs()  # a damaged shard is found on s3 too
    name = out.removeprefix("s3://") + "/000001.tar"
    fs.pipe_file(name, fs.cat_file(name)[:3000])
    proc = cnc(["inspect", out, "--n", "0"], workdir, timeout=120)
    assert proc.returncode == 1 and "000001.tar" in proc.stdout and "truncated" in proc.stdout
    assert not list(workdir.iterdir())


def test_worker_that_cannot_see_a_local_output_stops_the_build(ray_local, photo_folder, tmp_path, workdir):
    """A worker on a node without the driver's folder (simulated: it looks for the probe under another name)."""
    src, _ = photo_folder
    env = dict(os.environ, CNC_TEST_FAULT_INJECTION=json.dumps({"hide_probe": True}))
    address = ["--address", ray_local.get_runtime_context().gcs_address]  # join the session's Ray: no start-up cost
    proc = cnc(build_args(src, tmp_path / "out") + address, workdir, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "must be shared storage every node mounts, or an object-store URL" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("*.tar"))


def test_train_sample_eval_on_s3(s3_server, tiny_shards, tiny_metrics_cache, workdir, tmp_path):
    """train s3 → s3 (checkpoints on the store, resume from the store on a fresh machine), then sample and evaluate
    the run straight from the bucket."""
    bucket = s3_server.bucket("cnc-train")
    fs = s3fs()
    for p in sorted(tiny_shards.glob("0*")):  # the marked shards of a finished build
        fs.put_file(str(p), f"cnc-train/shards/{p.name}")
    run = f"{bucket}/run"
    common = ["train", "--config", "train/tiny", "--set", f"data.train_shards=[{bucket}/shards]", "--set",
              f"output_dir={run}", "--set", "train.checkpointing_steps=1", "--set", "train.checkpoints_total_limit=1",
              "--set", "validation.num_samples=1", "--set", "train.report_to=none"]
    first = cnc(common + ["--set", "train.max_train_steps=2", "--set", f"train.scratch_dir={tmp_path / 'a'}"],
                workdir, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    objects = listing(run)
    assert "train_config.yaml" in objects and "checkpoint-2/trainer_state.json" in objects
    assert not any(n.startswith("checkpoint-1/") for n in objects), "rotation applies on the store"
    assert any(n.startswith("local_fuser/") for n in objects) and any(n.startswith("validation/") for n in objects)
    # a fresh machine (another scratch folder): resumes from the store's newest complete checkpoint
    second = cnc(common + ["--set", "train.max_train_steps=3", "--set", f"train.scratch_dir={tmp_path / 'b'}",
                           "--resume", "latest"], workdir, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 2" in second.stderr and "checkpoint-3/trainer_state.json" in listing(run)
    env = {**os.environ, "CNC_CACHE_DIR": str(tiny_metrics_cache), "HF_HUB_OFFLINE": "1"}
    tar = f"{bucket}/shards/000000.tar"
    key = next(iter(TarStream(tar).samples()))["__key__"]
    sampled = cnc(["sample", run, "--shard-sample", f"{tar}#{key}", "--steps", "1", "--height", "64", "--width",
                   "64", "--output", str(tmp_path / "samples")], workdir, env=env, timeout=600)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (tmp_path / "samples" / "sample_0.png").is_file()
    evaluated = cnc(["eval", f"{run}/checkpoint-3", "--shards", f"{bucket}/shards", "--output", str(tmp_path / "eval"),
                     "--n", "2", "--steps", "1", "--batch-size", "2", "--metrics-models", "tiny"], workdir, env=env,
                    timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 2
    assert not list(workdir.iterdir())

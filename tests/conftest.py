"""Shared fixtures: one local Ray on 127.0.0.1 per session, tiny photo folders, fast build overrides."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cnc.tiny import synthetic_photo

#: Overrides that make a tiny-model build take ~1 s of compute on two CPUs.
FAST_BUILD = [
    "resolution=64", "min_side=32", "inpaint.num_inference_steps=2", "samples_per_shard=3", "batch_size=2",
    "ray.num_workers=2", "ray.progress_interval_s=1",
]
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "build" / "tiny.yaml"


def write_jpeg(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)
    return path


def make_photo_folder(root: Path, n_good: int, bad: tuple[str, ...] = ("empty", "text", "truncated"),
                      seed: int = 0) -> dict[str, list[str]]:
    """Write ``n_good`` synthetic JPEGs ``img_000.jpg``... plus bad files into ``root`` with ``captions.jsonl``.

    Bad kinds: ``empty`` (zero-byte .jpg), ``text`` (a text file named .jpg), ``truncated`` (half a JPEG).
    Bad files are named after good ones (``img_001_empty.jpg``...) so that, in key order, they are
    spread over the shards. Returns ``{"good": keys, "bad": keys}`` (keys = file stems).
    """
    import json

    root.mkdir(parents=True, exist_ok=True)
    good = []
    for i in range(n_good):
        key = f"img_{i:03d}"
        write_jpeg(root / f"{key}.jpg", synthetic_photo(seed + i, 88 + 8 * (i % 3), 120 - 8 * (i % 2)))
        good.append(key)
    bad_keys = []
    for j, kind in enumerate(bad):
        path = root / f"img_{min(n_good - 1, 1 + 3 * j):03d}_{kind}.jpg"
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("this is a text file with a .jpg name\n")
        elif kind == "truncated":
            tmp = write_jpeg(root / "full.tmpimg", synthetic_photo(999, 96, 120))
            data = tmp.read_bytes()
            tmp.unlink()
            path.write_bytes(data[: len(data) // 2])
        else:
            raise ValueError(kind)
        bad_keys.append(path.stem)
    with open(root / "captions.jsonl", "w", encoding="utf-8") as f:
        for key in good + bad_keys:
            f.write(json.dumps({"key": key, "caption": f"a photo called {key}: test"}) + "\n")
    return {"good": good, "bad": bad_keys}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs, 127.0.0.1 only, no dashboard) for the whole session."""
    ray = pytest.importorskip("ray")
    from pipelines.ray_session import init_local_ray

    if not ray.is_initialized():
        init_local_ray(num_cpus=2, object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def reference_build(ray_local, photo_folder, tmp_path_factory):
    """One clean build of the 11-item photo folder (8 good, 3 bad) in 4 shards on 2 workers, shared by the tests
    that compare against a local build: ``(folder, BuildResult, source folder, {"good", "bad"} keys)``."""
    from cnc.config import load_config
    from pipelines.build import run_build
    from triplets.config import BuildConfig

    src, photos = photo_folder
    out = tmp_path_factory.mktemp("ref") / "build"
    cfg = load_config(BuildConfig, TINY_CONFIG, FAST_BUILD + ["max_failure_fraction=0.5"])
    result = run_build(cfg, str(src), out, progress=False)
    return out, result, src, photos


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """8 good synthetic photos + a zero-byte, a text and a truncated .jpg (11 items)."""
    root = tmp_path_factory.mktemp("photos")
    return root, make_photo_folder(root, 8)


@pytest.fixture
def tiny_photo_folder(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    """3 good synthetic photos + one truncated .jpg (1 bad of 4)."""
    root = tmp_path / "photos4"
    return root, make_photo_folder(root, 3, bad=("truncated",), seed=100)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Two marked shards of 6 tiny triplets at 64 px, built once per session (trainer tests)."""
    from cnc_model.training.tiny_data import build_tiny_shards

    root = tmp_path_factory.mktemp("cnc-train-shards")
    build_tiny_shards(root, n_images=6, n_shards=2, resolution=64)
    return root


@pytest.fixture(scope="session")
def tiny_metrics_cache(tmp_path_factory) -> Path:
    """A ``CNC_CACHE_DIR`` holding the seeded tiny metric networks of ``cnc eval --metrics-models tiny``."""
    from cnc_model.evaluation.models import materialise_tiny

    root = tmp_path_factory.mktemp("cnc-cache")
    materialise_tiny(cache=root)
    return root


@dataclass
class S3Server:
    """A real S3-compatible server (moto) on 127.0.0.1; ``env`` points clients (and subprocesses) at it."""

    endpoint: str
    env: dict[str, str]

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if needed) and return ``s3://name``."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server on a free 127.0.0.1 port for the session; torn down even when tests fail.

    Sets ``AWS_ENDPOINT_URL`` and dummy credentials in ``os.environ`` (so Ray workers and ``cnc`` subprocesses
    started by the tests reach it too) and restores the environment afterwards.
    """
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, env)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # cached clients point at the stopped server


def start_driver(cmd: list[str], log_path: Path, until, *, cwd: Path, env: dict, timeout: float = 180,
                 poll_s: float = 0.2):
    """Start ``cnc`` command ``cmd`` (output to ``log_path``) and return its Popen once ``until()`` is true.

    Fails the test (with the tail of the log) when the process exits first or ``timeout`` seconds pass; the caller
    kills or signals the process.
    """
    import subprocess
    import time

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not until():
            assert proc.poll() is None, Path(log_path).read_text()[-3000:]
            assert time.monotonic() < deadline, f"condition not reached in {timeout:.0f} s"
            time.sleep(poll_s)
    except BaseException:
        proc.kill()
        raise
    return proc

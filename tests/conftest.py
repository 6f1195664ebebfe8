"""Shared fixtures: one local Ray on 127.0.0.1 per session, tiny photo folders, tiny shards, a local S3 server."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import FAST_BUILD, TINY_CONFIG, HubStandIn, make_photo_folder

#: What marks a test file as using Ray: its own cluster, or the session's local Ray (directly or through a build).
_RAY_USES = ("pytest.mark.ray", "ray_local", "reference_build")


def _ray_files(root: Path) -> frozenset[str]:
    """Test files (relative paths, as in node ids) that use Ray."""
    tests = root / "tests"
    return frozenset(p.relative_to(root).as_posix() for p in tests.rglob("test_*.py")
                     if any(use in p.read_text(encoding="utf-8") for use in _RAY_USES))


def pytest_xdist_make_scheduler(config, log):
    """``make test`` runs the suite on both cores (pytest-xdist ``-n 2``). The tests of every file that uses Ray form
    one scope, which one worker runs one test after the other: one local Ray per session as before, no two Ray
    clusters fighting over two cores (or over ports), kill tests keep their timing; the other worker takes the other
    tests one by one. (xdist's own ``--dist loadgroup`` cannot do this under pytest 9: it renames node ids.)"""
    from xdist.scheduler import LoadScopeScheduling

    ray_files = _ray_files(config.rootpath)

    class RayScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid.split("::", 1)[0] in ray_files else nodeid

    return RayScopeScheduling(config, log)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs, 127.0.0.1 only, no dashboard) for the whole session."""
    ray = pytest.importorskip("ray")
    from cnc.ray_session import init_local_ray

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


@pytest.fixture
def hub_server():
    """A local stand-in of the Hugging Face Hub API on 127.0.0.1 (:class:`tests.support.HubStandIn`); clients reach
    it through ``HF_ENDPOINT`` (set it in the environment of the ``cnc`` subprocesses)."""
    hub = HubStandIn()
    try:
        yield hub
    finally:
        hub.close()


@pytest.fixture
def memory_fs():
    """``(fsspec memory filesystem, a fresh root folder)``: stands in for s3/gs in reader unit tests (the S3 journeys
    use :func:`s3_server`)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "/cnc-remote-readers"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    yield fs, root
    fs.rm(root, recursive=True)


@pytest.fixture(scope="session")
def photo_table(tmp_path_factory) -> tuple[Path, dict]:
    """The 11-item photo folder (8 good, 3 bad) described by two parquet files of 6 and 5 rows in a folder of their
    own (the input); image paths absolute. Tests only read it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.support import make_photo_folder, table_rows

    base = tmp_path_factory.mktemp("table")
    photos = make_photo_folder(base / "images", 8)
    keys = sorted(photos["good"] + photos["bad"])
    root = base / "tables"
    root.mkdir()
    pq.write_table(pa.table(table_rows(keys[:6], f"{base}/images/")), root / "part-00000.parquet", row_group_size=4)
    pq.write_table(pa.table(table_rows(keys[6:], f"{base}/images/")), root / "part-00001.parquet", row_group_size=4)
    return root, photos


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for the module (a shared CPU machine: two threads spin against other load), restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_tmpfs(tmp_path):
    """``mount(kib) -> Path``: a fresh folder with a tmpfs of that size mounted on it (unmounted after the test), for
    disk-full tests. Skips, with the reason, where the test may not mount (not root, a container without
    CAP_SYS_ADMIN, no ``mount``)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("disk-full tests mount a small tmpfs: they need root and mount(8)")
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)

"""Shared test constants and factories (imported by tests as ``from tests.support import ...``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnc.tiny import synthetic_photo

#: Overrides that make a tiny-model build take ~1 s of compute on two CPUs.
FAST_BUILD = [
    "resolution=64", "min_side=32", "inpaint.num_inference_steps=2", "samples_per_shard=3", "batch_size=2",
    "ray.num_workers=2", "ray.progress_interval_s=1",
]
#: The repository root (tests start ``cnc`` subprocesses here).
REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "build" / "tiny.yaml"


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

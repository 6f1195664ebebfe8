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


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    """A JPEG of seeded random pixels, ``size`` = (width, height)."""
    import io

    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def tar_bytes(members, **tar_options) -> bytes:
    """An uncompressed tar (GNU format unless ``format=`` says otherwise) of ``(name, bytes)`` members, in order."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", **{"format": tarfile.GNU_FORMAT, **tar_options}) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


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


def table_rows(keys: list[str], folder: str = "") -> dict[str, list]:
    """Columns of a table input (img2dataset's names): ``url`` = ``{folder}{key}.jpg``, a caption, the key."""
    return {"url": [f"{folder}{k}.jpg" for k in keys], "caption": [f"a photo called {k}" for k in keys],
            "key": keys}


# -- builds ----------------------------------------------------------------------------------------------------------
def committed_keys(out: Path) -> tuple[list[str], list[str]]:
    """(sample keys over all tars, error keys over all error files) of build folder ``out`` — duplicates kept."""
    import json

    from triplets.shardio import iter_samples

    keys = [s.key for tar in sorted(out.glob("*.tar")) for s in iter_samples(str(tar))]  # every sample decodes
    errs = [json.loads(line)["key"] for f in sorted((out / "_cnc" / "errors").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    return keys, errs


def assert_exactly_once(out: Path, photos: dict) -> None:
    """Every good item of :func:`make_photo_folder` committed once, every bad one quarantined once, every tar with its
    marker, no temporaries left."""
    keys, errs = committed_keys(out)
    assert sorted(keys) == sorted(photos["good"]), "every good item exactly once"
    assert sorted(errs) == sorted(photos["bad"]), "every bad item quarantined exactly once"
    for tar in out.glob("*.tar"):
        assert (out / "_cnc" / f"{tar.stem}_stats.json").is_file(), f"{tar.name} has no marker"
    assert not list(out.rglob("*.tmp"))


# -- training ----------------------------------------------------------------------------------------------------------
def tiny_overrides(shards, out, *extra: str) -> list[str]:
    """``--set`` overrides of a two-step tiny training run on ``shards`` into ``out`` (CPU, no validation images)."""
    return [
        "model.pretrained_model_name_or_path=tiny", f"data.train_shards={shards}", f"output_dir={out}",
        "data.resolution=64", "data.num_workers=0", "data.shuffle_buffer=8", "train.mixed_precision=no",
        "train.gradient_checkpointing=false", "train.report_to=none", "train.progress_bar=false",
        "train.train_batch_size=2", "validation.num_samples=0", "optim.learning_rate=1e-4", *extra,
    ]


def train_cli_app():
    """A typer app holding only ``train`` (and a no-op, so ``train`` stays a sub-command), wrapped like ``cnc``."""
    import typer

    from cnc.cli import _wrap_commands
    from cnc_model.train_cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    _wrap_commands(app)  # the CLI's one user-error contract: UserError -> exit 2, one line
    return app

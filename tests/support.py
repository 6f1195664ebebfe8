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


#: A scripted response that never answers (the connection is accepted, no byte is ever sent).
HANG = "hang"


class WebServer:
    """A scripted HTTP server on 127.0.0.1 (a free port) for URL-input tests, in a background thread.

    ``route(path, *responses)``: each request of ``path`` takes the next response (the last one repeats); a
    response is ``(status, headers, body)`` or :data:`HANG`. Unrouted paths answer 404. ``requests`` records
    ``(path, headers)`` of every request (``request_times`` when it came), ``max_in_flight`` the most requests
    handled at once; ``delay_s`` delays every answer.
    """

    def __init__(self, delay_s: float = 0.0):
        import collections
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.routes: dict[str, collections.deque] = {}
        self.requests: list[tuple[str, dict]] = []
        self.request_times: list[float] = []  # time.monotonic() of each request
        self.in_flight = self.max_in_flight = 0
        self.delay_s = delay_s
        self.stop_event = threading.Event()
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with lock:
                    server.requests.append((self.path, dict(self.headers)))
                    server.request_times.append(time.monotonic())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    queue = server.routes.get(self.path)
                    response = (queue.popleft() if len(queue) > 1 else queue[0]) if queue else (404, {}, b"")
                try:
                    if response == HANG:
                        server.stop_event.wait()
                        return
                    if server.delay_s:
                        server.stop_event.wait(server.delay_s)
                    status, headers, body = response
                    self.send_response(status)
                    for k, v in {"Content-Length": str(len(body)), **headers}.items():
                        if v is not None:  # {"Content-Length": None}: no length, the body ends with the connection
                            self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    with lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def route(self, path: str, *responses) -> str:
        """Script ``path``; returns its URL."""
        import collections

        self.routes[path] = collections.deque(responses)
        return self.url + path

    def hits(self, path: str) -> int:
        return sum(p == path for p, _ in self.requests)

    def __enter__(self) -> WebServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def photo_bytes(seed: int, h: int = 96, w: int = 120) -> bytes:
    """A synthetic photo (:func:`cnc.tiny.synthetic_photo`: a salient blob on a textured background) as JPEG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(seed, h, w)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()

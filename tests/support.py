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
#: Stated tolerance of reduced precision (bf16 autocast) vs fp32 on the tiny models: every SAM candidate mask keeps an
#: IoU ≥ 0.95 with its fp32 counterpart, its predicted IoU score is within 0.05, and the DPT disparity (min-max
#: normalised per map) is within 0.03 of the fp32 one on average (max 0.1).
MASK_IOU_MIN, SCORE_ATOL, DEPTH_MEAN_ATOL, DEPTH_MAX_ATOL = 0.95, 0.05, 0.03, 0.1
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


def local_http_server(handler):
    """A threaded HTTP server on 127.0.0.1 (a free port) with daemon handler threads and a listen backlog of 128.

    socketserver's default backlog is 5: a burst of concurrent requests (a fetch window, parallel hub downloads) on a
    loaded machine overflows it, a SYN is dropped and the kernel resends it only after 1 s, past a test's short
    connect timeout (a fetch test failed 6 of 12 runs under load with 5, 0 of 12 with 128). A real host's is far larger.
    """
    from http.server import ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

    return Server(("127.0.0.1", 0), handler)


class HubStandIn:
    """A local stand-in of the parts of the Hugging Face Hub HTTP API that ``huggingface_hub`` uses to create a repo,
    upload a folder, push a card and download a snapshot (``HF_ENDPOINT`` points clients at it; 127.0.0.1 only).

    Implemented: ``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST /api/{type}s/{repo}/preupload/{rev}``
    (every file ``regular``: its bytes travel base64 in the commit; files the repo holds with the same git blob hash
    are reported by ``oid``, so a rerun skips them), ``POST /api/{type}s/{repo}/commit/{rev}`` (NDJSON),
    ``GET /api/{type}s/{repo}[/revision/{rev}]`` (repo info with ``siblings``), ``GET /api/{type}s/{repo}/tree/{rev}``
    (one page), ``HEAD``/``GET
    /[{type}s/]{repo}/resolve/{rev}/{path}``. Not implemented: LFS and Xet transfers, pull requests, auth checks.

    Attributes:
        repos: ``(type, repo_id)`` → ``{"private": bool, "files": {path: bytes}, "commits": [{"message", "paths"}]}``.
    """

    def __init__(self):
        import threading

        self.repos: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str]] = []
        handler = self._handler()
        self.server = local_http_server(handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def git_oid(data: bytes) -> str:
        import hashlib

        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _handler(self):
        import base64
        import hashlib
        import json
        import re
        from http.server import BaseHTTPRequestHandler

        hub = self
        api = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(preupload|commit|revision|tree)/([^/?]+))?"
                         r"(?:/(.+))?$")
        resolve = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body, headers: dict | None = None, head: bool = False) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if not isinstance(body, bytes)
                                 else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _repo(self, kind: str, repo_id: str) -> dict | None:
                return hub.repos.get((kind.rstrip("s"), repo_id))

            def do_POST(self):  # noqa: N802
                from urllib.parse import urlparse

                path = urlparse(self.path).path
                hub.requests.append(("POST", path))
                body = self._body()
                if path == "/api/repos/create":
                    d = json.loads(body)
                    kind = d.get("type") or "model"
                    repo_id = f"{d['organization']}/{d['name']}" if d.get("organization") else d["name"]
                    prefix = "" if kind == "model" else f"{kind}s/"
                    url = {"url": f"{hub.endpoint}/{prefix}{repo_id}", "name": repo_id}
                    if (kind, repo_id) in hub.repos:
                        return self._send(409, {**url, "error": "You already created this repo"})
                    hub.repos[(kind, repo_id)] = {"private": d.get("visibility") == "private" or bool(d.get("private")),
                                                  "files": {}, "commits": []}
                    return self._send(200, url)
                if path == "/api/validate-yaml":
                    return self._send(200, {})
                m = api.match(path)
                repo = self._repo(m.group(1), m.group(2)) if m else None
                if repo is None:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if m.group(3) == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": hub.git_oid(repo["files"][f["path"]]) if f["path"] in repo["files"] else None}
                        for f in files]})
                if m.group(3) == "commit":
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    paths = []
                    for x in lines:
                        if x["key"] == "file":
                            repo["files"][x["value"]["path"]] = base64.b64decode(x["value"]["content"])
                            paths.append(x["value"]["path"])
                        elif x["key"] == "deletedFile":
                            repo["files"].pop(x["value"]["path"], None)
                    oid = hashlib.sha1(json.dumps([len(repo["commits"]), paths]).encode()).hexdigest()
                    repo["commits"].append({"message": header.get("summary"), "paths": paths, "oid": oid})
                    return self._send(200, {"commitUrl": f"{hub.endpoint}/{m.group(2)}/commit/{oid}",
                                            "commitOid": oid, "pullRequestUrl": None})
                return self._send(404, {"error": f"not in the stand-in: POST {path}"})

            def _info(self, kind: str, repo_id: str, repo: dict) -> dict:
                sha = repo["commits"][-1]["oid"] if repo["commits"] else "0" * 40
                return {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo["private"],
                        "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(repo["files"].items())],
                        "tags": [], "downloads": 0, "likes": 0, "lastModified": "2026-01-01T00:00:00.000Z"}

            def _get(self, head: bool) -> None:
                from urllib.parse import unquote, urlparse

                path = unquote(urlparse(self.path).path)
                hub.requests.append(("HEAD" if head else "GET", path))
                m = api.match(path)
                if m and m.group(3) == "tree":  # one page, every file (recursive listing)
                    repo = self._repo(m.group(1), m.group(2)) or {"files": {}}
                    under = (m.group(5) or "").rstrip("/")
                    return self._send(200, [{"type": "file", "path": p, "size": len(b), "oid": hub.git_oid(b)}
                                            for p, b in sorted(repo["files"].items())
                                            if not under or p.startswith(under + "/")], head=head)
                if m and m.group(3) in (None, "revision"):
                    repo = self._repo(m.group(1), m.group(2))
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"},
                                          head)
                    return self._send(200, self._info(m.group(1), m.group(2), repo), head=head)
                m = resolve.match(path)
                if m:
                    repo = hub.repos.get(((m.group(1) or "models").rstrip("s"), m.group(2)))
                    data = None if repo is None else repo["files"].get(m.group(4))
                    if data is None:
                        return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"},
                                          head)
                    sha = repo["commits"][-1]["oid"]
                    return self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{hub.git_oid(data)}"'}, head)
                return self._send(404, {"error": f"not in the stand-in: GET {path}"}, head=head)

            def do_GET(self):  # noqa: N802
                self._get(head=False)

            def do_HEAD(self):  # noqa: N802
                self._get(head=True)

        return Handler


def table_rows(keys: list[str], folder: str = "") -> dict[str, list]:
    """Columns of a table input (img2dataset's names): ``url`` = ``{folder}{key}.jpg``, a caption, the key."""
    return {"url": [f"{folder}{k}.jpg" for k in keys], "caption": [f"a photo called {k}" for k in keys],
            "key": keys}


# -- samples ------------------------------------------------------------------------------------------------------
def make_sample(key: str = "k", seed: int = 0, *, size: int = 32, dim: int = 8, nearer: bool = True,
                caption: str = "a disk on random noise", meta: dict | None = None):
    """The one test factory of a well-formed :class:`~triplets.sample.TripletSample` (``size`` px, ``dim``-wide
    embeddings): a centred disk mask, foreground disparity peaking inside it (``nearer``; outside it otherwise),
    seeded random images, depths and embeddings, and every ``REQUIRED_META`` key set (``meta`` overrides them)."""
    from triplets.sample import TripletSample, quantize_depth

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    mask = (((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (size / 4) ** 2).astype(np.uint8)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    fq, fr = quantize_depth((mask if nearer else 1 - mask) * 5.0 + rng.random((size, size)))
    bq, br = quantize_depth(rng.random((size, size)))
    full_meta = {"key": key, "source": f"/data/{key}.jpg", "original_size": [size, size],
                 "crop_box": [0, 0, size, size, 1.0], "resolution": size, "seed": seed, "models": {},
                 "mask_area": float(mask.mean()), "fg_depth_range": list(fr), "bg_depth_range": list(br),
                 "timings": {}, "version": "test", **(meta or {})}
    return TripletSample(key=key, image=image, mask=mask,
                         background=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), fg_depth=fq, bg_depth=bq,
                         fg_emb=rng.normal(size=dim).astype(np.float32), bg_emb=rng.normal(size=dim).astype(np.float32),
                         caption=caption, meta=full_meta)


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

    from cnc.commands import wrap_commands
    from cnc_model.train_cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    wrap_commands(app)  # the CLI's one user-error contract: UserError -> exit 2, one line
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
        from http.server import BaseHTTPRequestHandler

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

        self.httpd = local_http_server(Handler)
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

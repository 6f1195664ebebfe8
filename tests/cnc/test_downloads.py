"""``cnc models`` (issue 18): published files from a local HTTP server (sha256, resume), hub models offline."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cnc.downloads import DownloadError, FileSpec, download_file
from tests.support import REPO, local_http_server

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB "checkpoint"


class _Server:
    """Serves ``PAYLOAD`` at any path on 127.0.0.1 with HTTP Range support; ``cut_at`` drops the connection there."""

    def __init__(self):
        self.cut_at: int | None = None
        self.ranges: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(PAYLOAD) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                self.end_headers()
                end = len(PAYLOAD) if server.cut_at is None else server.cut_at
                self.wfile.write(PAYLOAD[start:end])
                self.wfile.flush()
                if server.cut_at is not None:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = local_http_server(Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


def _spec(sha: str | None = None) -> FileSpec:
    return FileSpec("fake.pth", "http://unused.invalid/", sha or hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))


def test_download_checks_sha256_and_resumes_an_interrupted_transfer(server, tmp_path):
    # interrupted: the partial file stays, nothing is renamed into place, the error is one line
    server.cut_at = len(PAYLOAD) // 3
    with pytest.raises(DownloadError) as err:
        download_file(_spec(), tmp_path, base_url=server.url, progress=False, timeout=5)
    assert "fake.pth" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "fake.pth").exists()
    have = (tmp_path / "fake.pth.part").stat().st_size
    assert 0 < have <= len(PAYLOAD) // 3
    # rerun: continues with a Range request from the partial size, checks the sha256, renames into place
    server.cut_at = None
    path = download_file(_spec(), tmp_path, base_url=server.url, progress=False)
    assert path == tmp_path / "fake.pth" and path.read_bytes() == PAYLOAD
    assert server.ranges[-1] == f"bytes={have}-"
    assert not (tmp_path / "fake.pth.part").exists()
    # already there: no request at all
    n = len(server.ranges)
    assert download_file(_spec(), tmp_path, base_url=server.url, progress=False) == path and len(server.ranges) == n

    # wrong sha256: refused, nothing kept
    other = tmp_path / "other"
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        download_file(_spec("0" * 64), other, base_url=server.url, progress=False)
    assert not any(other.iterdir())


def test_cli_download_of_the_sam_checkpoint_from_a_mirror(server, tmp_path):
    cfg = tmp_path / "build.yaml"
    cfg.write_text((REPO / "configs/build/tiny.yaml").read_text().replace(
        "sam_checkpoint: tiny", "sam_checkpoint: sam_vit_b_01ec64.pth"))
    env = dict(os.environ, CNC_DOWNLOAD_BASE_URL=server.url, CNC_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", "models", "download", "--config", str(cfg),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    # the mirror serves other bytes than the published SAM ViT-B: one line naming the key, the file and the reason
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "segment.sam_checkpoint" in lines[0] and "sha256" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "files" / "sam_vit_b_01ec64.pth").exists()
    assert server.ranges and server.ranges[0] is None  # it did ask the configured base URL


def _fake_hub_snapshot(hf_home: Path, repo: str, commit: str, source: Path) -> Path:
    """A Hugging Face cache entry (refs/main + snapshots/<commit>/...) holding a copy of ``source``."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    shutil.copytree(source, snap)
    return snap


def test_hub_models_resolve_offline_from_a_prefilled_cache(tmp_path):
    from cnc.tiny_store import materialize

    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _fake_hub_snapshot(tmp_path / "hf", "org/tiny-dpt", commit, materialize("depth"))
    cfg = tmp_path / "build.yaml"
    cfg.write_text((REPO / "configs/build/tiny.yaml").read_text().replace(
        "  model: tiny\n  mask_foreground_depth", "  model: org/tiny-dpt\n  mask_foreground_depth"))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    # one fresh process (huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import): list, download, resolve
    code = ("import json, sys; from typer.testing import CliRunner; from cnc.cli import app\n"
            "from cnc.config import load_config; from triplets.config import BuildConfig\n"
            "from triplets.builder import resolve_models, model_identities\n"
            f"cfg_path = {str(cfg)!r}\n"
            "ls = CliRunner().invoke(app, ['models', 'list', '--config', cfg_path])\n"
            "dl = CliRunner().invoke(app, ['models', 'download', '--config', cfg_path, '--no-progress'])\n"
            "cfg = load_config(BuildConfig, cfg_path); r = resolve_models(cfg)\n"
            f"missing = CliRunner().invoke(app, ['models', 'download', '--config', {str(tmp_path / 'missing.yaml')!r},"
            " '--no-progress'])\n"
            "print(json.dumps([ls.exit_code, ls.output, dl.exit_code, r['depth.model'],"
            " model_identities(cfg, r)['depth.model'], missing.exit_code, missing.output]))")
    (tmp_path / "missing.yaml").write_text(cfg.read_text().replace("model: org/tiny-dpt", "model: org/not-cached"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ls_code, ls_out, dl_code, path, ident, miss_code, miss_out = json.loads(proc.stdout.strip().splitlines()[-1])
    row = next(ln for ln in ls_out.splitlines() if ln.startswith("depth.model"))
    assert ls_code == 0 and "org/tiny-dpt" in row and "cached" in row and str(snap) in row
    assert dl_code == 0  # cached: nothing to fetch, no network needed
    assert path == str(snap) and ident == {"id": "org/tiny-dpt", "revision": commit, "identity": f"hub:{commit}"}
    # a hub model that is not cached fails offline with one line naming the model and its key
    lines = [ln for ln in miss_out.splitlines() if "org/not-cached" in ln]
    assert miss_code == 1 and len(lines) == 1 and "depth.model" in lines[0] and "HF_HUB_OFFLINE" in lines[0]

def test_download_without_network_fails_fast_one_line_per_model(tmp_path):
    # nothing listens on port 9 of 127.0.0.1: the hub and the file server are both unreachable
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), CNC_CACHE=str(tmp_path / "cache"),
               HF_ENDPOINT="http://127.0.0.1:9", CNC_DOWNLOAD_BASE_URL="http://127.0.0.1:9/sam")
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", "models", "download", "--config", "default",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    keys = ("inpaint.model", "depth.model", "embed.model", "segment.sam_checkpoint")
    assert len(lines) == len(keys) and all(k in ln for k, ln in zip(keys, lines))
    assert all("cannot reach 127.0.0.1:9" in ln for ln in lines) and "Traceback" not in proc.stderr
    listed = subprocess.run([sys.executable, "-m", "cnc.cli", "models", "list", "--config", "default"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and listed.stdout.count("missing") == len(keys)
    assert "2.6 GB" in next(ln for ln in listed.stdout.splitlines() if ln.startswith("segment.sam_checkpoint"))

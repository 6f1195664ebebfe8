"""Downloads of the models a config names: hub ids into the Hugging Face cache, published files into the cnc cache.

Hub models go through ``huggingface_hub.snapshot_download`` (its own resume and progress; ``HF_HOME`` /
``HF_HUB_CACHE`` / ``HF_ENDPOINT`` apply). Single-file checkpoints that no hub hosts (segment-anything's SAM) are
listed in :data:`KNOWN_FILES` with their published URL and sha256; :func:`download_file` fetches one into
``<cnc cache>/files/<name>`` (:func:`files_dir`) with a progress bar, resumes a partial ``<name>.part`` by an HTTP
``Range`` request, checks the sha256 and only then renames the file into place, so a half or wrong file is never
used. The base URL comes from ``$CNC_DOWNLOAD_BASE_URL`` or ``--base-url`` (a mirror, or a local server in tests).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cnc.base.hashing import file_sha256
from cnc.tiny_store import cache_root

log = logging.getLogger(__name__)

#: Environment variable overriding the base URL of :data:`KNOWN_FILES` (a mirror, an internal server).
BASE_URL_ENV = "CNC_DOWNLOAD_BASE_URL"
#: Environment variable overriding the folder of downloaded files (default ``<cnc cache>/files``).
FILES_ENV = "CNC_FILES_DIR"
SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A download failed (message: one line naming the file and the reason)."""


@dataclass(frozen=True)
class FileSpec:
    """A published single-file checkpoint: file name, base URL, sha256 and size in bytes (``None`` = unknown)."""

    name: str
    base_url: str
    sha256: str
    size: int | None = None

    @property
    def url(self) -> str:
        return url_for(self)


#: Published checkpoints a config may name by file name (``segment.sam_checkpoint: sam_vit_h_4b8939.pth``).
KNOWN_FILES: dict[str, FileSpec] = {s.name: s for s in (
    FileSpec("sam_vit_h_4b8939.pth", SAM_BASE_URL, "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
             2_564_550_879),
    FileSpec("sam_vit_l_0b3195.pth", SAM_BASE_URL, "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    FileSpec("sam_vit_b_01ec64.pth", SAM_BASE_URL, "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
)}


def files_dir() -> Path:
    """Folder of downloaded files: ``$CNC_FILES_DIR`` or ``<cnc cache>/files``."""
    return Path(os.environ.get(FILES_ENV) or cache_root() / "files").expanduser()


def known_file(model_id: str) -> FileSpec | None:
    """The :data:`KNOWN_FILES` entry of a config value (a bare name or any path ending in that name)."""
    return KNOWN_FILES.get(Path(model_id).name)


def cached_file(spec: FileSpec, directory: Path | None = None) -> Path | None:
    """The downloaded (sha-checked when it was written) file of ``spec``, or ``None``."""
    path = (directory or files_dir()) / spec.name
    return path if path.is_file() else None


def url_for(spec: FileSpec, base_url: str | None = None) -> str:
    """``base_url`` (or ``$CNC_DOWNLOAD_BASE_URL``, or the published one) + the file name."""
    base = base_url or os.environ.get(BASE_URL_ENV) or spec.base_url
    return base.rstrip("/") + "/" + spec.name


@functools.cache
def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why the host of ``url`` cannot be reached (DNS or TCP connect, one try), or ``None`` when it can.

    Lets a download command fail in seconds, one line per model, on a machine without network instead of waiting
    out every client's retries.
    """
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return f"no host in {url!r}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.strerror or type(exc).__name__})"


def download_file(spec: FileSpec, directory: Path | None = None, base_url: str | None = None,
                  progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch ``spec`` into ``directory`` (default :func:`files_dir`) and return the checked file.

    A partial ``NAME.part`` left by an interrupted run is continued with ``Range: bytes=N-`` (restarted when the
    server ignores the range). The sha256 is checked before the file is renamed into place; a mismatch deletes the
    partial file.

    Raises:
        DownloadError: one line naming the file, the URL and the reason (HTTP status, network error, sha256).
    """
    import requests
    from tqdm.auto import tqdm

    directory = directory or files_dir()
    final = directory / spec.name
    if final.is_file():
        return final
    directory.mkdir(parents=True, exist_ok=True)
    part = directory / f"{spec.name}.part"
    url = url_for(spec, base_url)
    if (why := unreachable(url)) is not None:
        raise DownloadError(f"{url}: {why}")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
            if resp.status_code == 416 and have:  # already complete
                pass
            elif resp.status_code not in (200, 206):
                raise DownloadError(f"{url} answered HTTP {resp.status_code}")
            else:
                if resp.status_code == 200 and have:
                    log.info("%s: the server ignored the range request; starting again", spec.name)
                    have = 0
                if have:
                    log.info("%s: resuming at %d bytes", spec.name, have)
                total = spec.size or (have + int(resp.headers.get("Content-Length", 0)) or None)
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, desc=spec.name,
                        disable=not progress) as bar:
                    for chunk in resp.iter_content(_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
    except requests.RequestException as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise DownloadError(f"download from {url} failed ({type(exc).__name__}{': ' + reason if reason else ''}); "
                            f"rerun to resume") from None
    digest = file_sha256(part)
    if digest != spec.sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"sha256 {digest} of {spec.name} does not match the published {spec.sha256} "
                            f"(from {url}); the partial file was deleted")
    os.replace(part, final)
    log.info("%s: %s (%d bytes, sha256 ok)", spec.name, final, final.stat().st_size)
    return final

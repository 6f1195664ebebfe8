"""Locations: one way for every command to name a place — a local path or any fsspec URL.

:func:`resolve` turns what the user typed into a :class:`Location` (filesystem + path) exactly once, at the entry
point. A scheme no installed backend handles is refused with :class:`~cnc.base.errors.LocationError` (one line
naming the missing package); a string that only *looks* like a URL (``s3:/bucket``, ``gs:bucket``) is refused too —
it is never turned into a local folder with a colon in its name.

Writes are atomic on both kinds of storage:

* local: a unique temporary name beside the target (``NAME.<hex>.tmp``), fsync, ``os.replace``, fsync of the folder;
* object stores: a single PUT (``fs.pipe_file``) or a completed multipart upload (``fs.put_file`` / a streamed
  ``fs.open(..., "wb")`` that is *discarded*, never completed, when writing fails). Readers see the whole object or
  nothing; there is no rename.

``create_exclusive`` writes an object only if it does not exist yet (``O_EXCL`` locally; ``If-None-Match: *`` on S3,
``ifGenerationMatch=0`` on GCS through fsspec's ``mode="create"``); :attr:`Location.exclusive_create` says whether
the backend guarantees it.

Size: one class (Location) with the queries and atomic writes every layer needs, on both kinds of storage; splitting
it would separate a write from its local/remote twin.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cnc.base import jsonio
from cnc.base.errors import LocationError, naming_path

#: ``proto://...``
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: ``proto:...`` without ``//`` — looks like a URL but is malformed (``s3:/bucket`` after a shell or path join).
_SCHEME_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
#: The package that provides each common scheme (for the refusal message).
SCHEME_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                   "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp",
                   "oci": "ocifs", "hdfs": "pyarrow"}
#: Backends whose ``pipe_file(..., mode="create")`` is a real create-if-absent precondition.
_EXCLUSIVE_PROTOCOLS = {"s3", "s3a", "gs", "gcs"}


def temp_name(name: str) -> str:
    """A unique temporary name for ``name``: ``000003.tar`` → ``000003.tar.<12 hex>.tmp`` (never ends in ``.tar``)."""
    return f"{name}.{uuid.uuid4().hex[:12]}.tmp"


#: Names :func:`temp_name` produces (the suffix the project's own temporaries carry).
TEMP_NAME = re.compile(r"^(?P<final>.+)\.[0-9a-f]{12}\.tmp$")


def fsync_replace(tmp: str | Path, final: str | Path) -> None:
    """fsync ``tmp``, rename it onto ``final`` and fsync the folder (atomic on one local filesystem)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    with contextlib.suppress(OSError):  # folders cannot be fsynced on some filesystems
        dfd = os.open(Path(final).parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass(frozen=True)
class Location:
    """A place on some filesystem.

    Attributes:
        url: canonical form — an absolute local path, or ``proto://bucket/key`` (what to show, store and pass on).
        fs: the fsspec filesystem.
        path: the path in ``fs``'s own form (``bucket/key`` for object stores).
    """

    url: str
    fs: Any
    path: str

    # -- naming ------------------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    @property
    def protocol(self) -> str:
        return _protocols(self.fs)[0]

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def exclusive_create(self) -> bool:
        """Whether :meth:`create_exclusive` is a real create-if-absent precondition on this backend."""
        return self.is_local or self.protocol in _EXCLUSIVE_PROTOCOLS

    def child(self, *parts: str) -> Location:
        """``loc.child("errors", "000001.jsonl")``."""
        path = "/".join([self.path.rstrip("/"), *(p.strip("/") for p in parts if p)])
        return Location(self._url_of(path), self.fs, path)

    @property
    def parent(self) -> Location:
        path = self.path.rstrip("/").rsplit("/", 1)[0] or "/"
        return Location(self._url_of(path), self.fs, path)

    def _url_of(self, path: str) -> str:
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def local_path(self) -> Path:
        """The :class:`~pathlib.Path` of a local location (raises for remote ones)."""
        if not self.is_local:
            raise LocationError(f"{self.url} is not a local path")
        return Path(self.path)

    def __str__(self) -> str:
        return self.url

    # -- queries -----------------------------------------------------------------------------------------
    # Object-store clients cache listings (s3fs, gcsfs); other processes (workers, other drivers) write here, so
    # every query drops the cache for this path first.
    def _fresh(self) -> None:
        if not self.is_local:
            self.fs.invalidate_cache(self.path)

    def exists(self) -> bool:
        self._fresh()
        return bool(self.fs.exists(self.path))

    def isdir(self) -> bool:
        self._fresh()
        return bool(self.fs.isdir(self.path))

    def isfile(self) -> bool:
        if self.is_local:  # a FIFO or device named like a file is not one (reading it could block)
            return Path(self.path).is_file()
        self._fresh()
        return bool(self.fs.isfile(self.path))

    def size(self) -> int | None:
        """Size in bytes, ``None`` when it does not exist."""
        self._fresh()
        try:
            return int(self.fs.size(self.path))
        except (FileNotFoundError, OSError):
            return None

    def list(self) -> dict[str, dict]:
        """Direct children: ``{name: {"type": "file"|"directory", "size": int}}`` (empty when missing)."""
        self._fresh()
        try:
            entries = self.fs.ls(self.path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        out = {}
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            if name and str(e["name"]).rstrip("/") != self.path.rstrip("/"):
                out[name] = {"type": e.get("type"), "size": e.get("size")}
        return out

    def glob(self, pattern: str) -> list[Location]:
        """Sorted matches of ``pattern`` below this location (``*.tar``)."""
        self._fresh()
        matches = self.fs.glob(self.path.rstrip("/") + "/" + pattern)
        return [Location(self._url_of(p), self.fs, p) for p in sorted(matches)]

    # -- reading -----------------------------------------------------------------------------------------
    def open(self, mode: str = "rb", **kwargs) -> IO:
        return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return jsonio.loads(self.read_bytes(), what=self.name or "json", max_bytes=None)

    # -- writing -----------------------------------------------------------------------------------------
    def makedirs(self) -> None:
        """Create the folder (local; object stores have no folders)."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, data: bytes) -> Location:
        """Atomically write ``data`` (local temp + fsync + rename; one PUT on object stores)."""
        if self.is_local:
            with self.open_atomic() as f:
                f.write(data)
        else:  # one PUT rather than open_atomic's multipart upload
            self.fs.pipe_file(self.path, data)
        return self

    def write_text(self, text: str) -> Location:
        return self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj: Any, indent: int | None = 1) -> Location:
        """Atomically write ``obj`` as sorted-key JSON."""
        return self.write_text(json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False) + "\n")

    def create_exclusive(self, data: bytes) -> bool:
        """Write ``data`` only if nothing exists here; ``False`` when something does.

        Local: ``O_CREAT | O_EXCL``. S3/GCS: a conditional PUT. Other backends: check, then write — two writers
        racing within one round trip can both succeed there (see :attr:`exclusive_create`).
        """
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with naming_path(self.path), os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.protocol in _EXCLUSIVE_PROTOCOLS:
            try:
                self.fs.pipe_file(self.path, data, mode="create")
            except FileExistsError:
                return False
            except OSError as exc:  # botocore surfaces 412 Precondition Failed as a generic error on some servers
                if "412" in str(exc) or "PreconditionFailed" in str(exc):
                    return False
                raise
            return True
        if self.exists():
            return False
        self.fs.pipe_file(self.path, data)
        return True

    def upload(self, local_file: str | Path, *, move: bool = False) -> Location:
        """Publish a finished local file here atomically (rename or copy locally; a (multipart) upload remotely).

        With ``move`` a local source is renamed when possible (same filesystem) instead of copied.
        """
        if self.is_local:
            final = Path(self.path)
            final.parent.mkdir(parents=True, exist_ok=True)
            src = Path(local_file)
            if move and os.stat(src).st_dev == os.stat(final.parent).st_dev:
                fsync_replace(src, final)
                return self
            tmp = final.with_name(temp_name(final.name))
            try:
                shutil.copyfile(src, tmp)
                fsync_replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            self.fs.put_file(str(local_file), self.path)
        return self

    def download(self, local_file: str | Path) -> Path:
        """Copy this file to a local path (returns it)."""
        local_file = Path(local_file)
        local_file.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self.path, str(local_file))
        return local_file

    @contextlib.contextmanager
    def open_atomic(self) -> Iterator[IO[bytes]]:
        """A binary writer whose content becomes visible here only if the block ends without an exception.

        Local: a temporary file renamed on success. Object stores: a streamed (multipart) upload completed on
        success and discarded (never completed) on failure, so no partial object is ever visible.
        """
        if self.is_local:
            final = Path(self.path)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(temp_name(final.name))
            try:
                with naming_path(final), open(tmp, "wb") as f:  # a full disk says which file it stopped
                    yield f
                fsync_replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            return
        f = self.fs.open(self.path, "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()
            f.closed = True  # never completed: nothing to flush when the object is collected
            raise
        f.close()

    def rm(self, missing_ok: bool = True) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def is_url(spec: str) -> bool:
    """``True`` for ``proto://...`` strings (``file://`` included)."""
    return bool(_URL.match(spec))


def looks_like_url(spec: str) -> bool:
    """``True`` for ``proto:...`` strings — URLs, and what ``pathlib`` makes of them (``s3://b`` → ``s3:/b``)."""
    return bool(_SCHEME_LIKE.match(spec))


def resolve(spec: str | os.PathLike | Location) -> Location:
    """The :class:`Location` of a local path or fsspec URL.

    Local paths become absolute (``~`` expanded); ``file://`` is dropped. URLs go through
    ``fsspec.core.url_to_fs``; credentials come from each backend's standard environment and config files.

    Raises:
        LocationError: a scheme no installed backend handles (naming the package to install), a string that looks
            like a malformed URL (``s3:/bucket``), ``pipe:`` (readable as a tar stream only), or an empty string.
    """
    if isinstance(spec, Location):
        return spec
    s = os.fspath(spec)
    if not s.strip():
        raise LocationError("empty path")
    if s.startswith("file://"):
        s = s[len("file://"):]
    m = _URL.match(s)
    if m is None:
        bad = _SCHEME_LIKE.match(s)
        if bad:
            scheme = bad.group(1)
            if scheme == "pipe":
                raise LocationError(f"{s!r}: a pipe: command can only be read as a tar stream (shard inputs), "
                                    f"not used as a folder or file")
            raise LocationError(f"{s!r} looks like a URL but is malformed (write {scheme}://...; for a local path "
                                f"with a colon, write ./{s})")
        import fsspec

        path = os.path.abspath(os.path.expanduser(s))
        return Location(path, fsspec.filesystem("file"), path)
    scheme = m.group(1).lower()
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(s)
    except ImportError as exc:
        pkg = SCHEME_PACKAGES.get(scheme)
        hint = f"install {pkg} (pip install {pkg})" if pkg else f"install the fsspec backend for {scheme}://"
        raise LocationError(f"{s}: no filesystem backend for {scheme}:// is installed; {hint} ({exc})") from None
    except ValueError as exc:
        raise LocationError(f"{s}: unknown URL scheme {scheme}:// (no fsspec backend knows it: {exc})") from None
    loc = Location(s, fs, path)
    return Location(loc._url_of(path), fs, path)


def check_writable_output(spec: str | os.PathLike | Location) -> Location:
    """Refuse an output that cannot hold a build or run folder, before any work starts; returns its location.

    Object stores: refused when the URL names an existing object (a file, not a prefix). Local: refused when the
    path or a parent is an existing file, a broken symlink, or the nearest existing folder cannot be written
    (permissions or a read-only filesystem — tried for real, since ``os.access`` ignores read-only mounts for root).
    Nothing is created.

    Raises:
        LocationError: one line saying why.
    """
    loc = resolve(spec)
    if not loc.is_local:
        if loc.isfile():
            raise LocationError(f"output {loc.url} is an existing object, not a folder (prefix)")
        return loc
    p = loc.local_path()
    probe = p
    while not probe.exists():
        if probe.is_symlink():
            raise LocationError(f"output {p}: {probe} is a broken symlink")
        probe = probe.parent
    if not probe.is_dir():
        raise LocationError(f"output {p}: {probe} is an existing file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LocationError(f"output {p}: {probe} is not writable")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".cnc-write-test-"):
            pass
    except OSError as exc:
        raise LocationError(f"output {p}: cannot write in {probe} ({exc.strerror or exc})") from None
    return loc

"""Content identity of a model: what exactly a build or a training run loaded.

* a hub model (a Hugging Face cache snapshot, or a hub id ``from_pretrained`` downloads) is identified by its
  resolved commit: ``hub:<40-hex commit>``;
* a local folder or file (including the tiny checkpoints) by a hash of its weight files
  (:data:`WEIGHT_SUFFIXES`): ``sha256:<64 hex>`` over the sorted ``relative path + file sha256`` lines.

Hashing multi-GB weights is slow, so each file's sha256 is cached in ``<cnc cache>/weight-hashes.json`` keyed by
its absolute path, size and modification time (ns): a machine hashes a given file once, not once per build or per
worker. Replacing the file (new size or mtime) invalidates the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

from cnc.base.hashing import stream_sha256
from cnc.tiny_store import cache_root

log = logging.getLogger(__name__)

#: Files that make a model's identity (configs and tokenizer files are not weights).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
HASH_CACHE_FILE = "weight-hashes.json"


def _cache_path() -> Path:
    return cache_root() / HASH_CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, updates: dict) -> None:
    """Merge ``updates`` into the cache file (re-read first, so concurrent writers lose at most an entry)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read_cache(path), **updates}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs re-hashing
        log.debug("weight hash cache %s not written: %s", path, exc)


def file_sha256(path: str | Path, cache: dict | None = None, updates: dict | None = None) -> str:
    """sha256 of one weight file, from the (path, size, mtime) cache when it has the entry.

    Args:
        path: the file.
        cache: the loaded cache (``None`` = read it here and write any new entry back).
        updates: where new entries go when ``cache`` is given (written back by the caller).
    """
    own = cache is None
    cache = _read_cache(_cache_path()) if own else cache
    updates = {} if updates is None else updates
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    entry = cache.get(key)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    with open(p, "rb") as f:
        digest = stream_sha256(f)
    log.debug("hashed %s (%d bytes)", p, st.st_size)
    updates[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    if own:
        _write_cache(_cache_path(), updates)
    return digest


def weight_files(path: Path) -> list[Path]:
    """The weight files of a folder (recursive, sorted) or ``[path]`` for a file."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and ".cache" not in p.relative_to(path).parts)


def local_identity(path: str | Path) -> str:
    """``sha256:<hex>`` of the weight files of a local folder or file (cached per file)."""
    root = Path(path)
    cache, updates = _read_cache(_cache_path()), {}
    h = hashlib.sha256()
    files = weight_files(root)
    for f in files:
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        h.update(f"{rel}\0{file_sha256(f, cache, updates)}\n".encode())
    if updates:
        _write_cache(_cache_path(), updates)
    if not files:
        log.warning("%s holds no weight files (%s); its identity covers nothing", root, ", ".join(WEIGHT_SUFFIXES))
    return f"sha256:{h.hexdigest()}"


def hub_revision(resolved: str) -> str | None:
    """The commit hash when ``resolved`` is a Hugging Face cache snapshot folder (``.../snapshots/<commit>``)."""
    p = Path(resolved)
    return p.name if p.parent.name == "snapshots" else None


def model_identity(model_id: str, resolved: str) -> dict:
    """``{"id", "revision", "identity"}`` of one model.

    Args:
        model_id: the config value (``tiny``, a path, a hub id, a known file name).
        resolved: what :func:`cnc.hub.resolve_pretrained` returned for it.
    """
    revision = hub_revision(resolved)
    if revision is not None:
        return {"id": model_id, "revision": revision, "identity": f"hub:{revision}"}
    if Path(resolved).exists():
        return {"id": model_id, "revision": None, "identity": local_identity(resolved)}
    try:  # a hub id that from_pretrained will download: ask the hub which commit that is
        from huggingface_hub import HfApi

        sha = HfApi().model_info(model_id, timeout=10).sha
    except Exception as exc:  # noqa: BLE001 - unknown identity is recorded as such
        log.warning("identity of %s unknown (%s)", model_id, exc)
        sha = None
    return {"id": model_id, "revision": sha, "identity": f"hub:{sha}" if sha else None}


def identity_changes(old: dict, new: dict) -> list[str]:
    """``"KEY: OLD -> NEW"`` for every model key whose identity differs (keys absent on one side are skipped)."""
    out = []
    for key in sorted(set(old) & set(new)):
        a, b = (old[key] or {}).get("identity"), (new[key] or {}).get("identity")
        if a != b:
            out.append(f"{key}: {a} -> {b}")
    return out

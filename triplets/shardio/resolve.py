"""The one shard resolver: what the user names → the shard URLs to read, in a stable order.

Used by ``cnc build`` (WebDataset inputs), ``cnc inspect``, the trainer, ``cnc eval`` and ``cnc sample
--shard-sample``. A spec is a tar, a build folder or a folder of tars, a glob (``out/*.tar``), a brace pattern
(``out/{000000..000009}.tar``), any of those on an fsspec URL (``s3://bucket/run1``), or a ``pipe:`` command;
several specs may be given (a list, or one string joined with ``::`` as webdataset does).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence

from cnc.base.errors import UserError
from cnc.base.location import Location, resolve
from triplets.shardio.names import MARKER_SUFFIX, PLAN_FILE, SIDECAR_DIR, TAR_SUFFIX, is_marker

log = logging.getLogger(__name__)


class ShardSpecError(UserError, FileNotFoundError):
    """A shard spec that names nothing readable (missing files, an empty folder, a build without commits)."""


def _expand_braces(spec: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    return list(expand_urls(spec))


def folder_shards(loc: Location, committed_only: bool) -> list[str]:
    """The ``*.tar`` of a folder, sorted. In a build folder (it has ``_cnc/``, ``plan.json`` or markers) and with
    ``committed_only``, only the tars whose ``_stats.json`` marker exists (one or two listings, no request per
    shard; markers in ``_cnc/`` or, in folders of the legacy layout, beside the tars)."""
    entries = loc.list()
    if SIDECAR_DIR in entries:
        entries = {**entries, **{n: e for n, e in loc.child(SIDECAR_DIR).list().items() if n != SIDECAR_DIR}}
    tars = []
    for n, e in sorted(entries.items()):
        if n.endswith(TAR_SUFFIX) and e.get("type") == "file":
            tars.append(n)
        elif n.endswith(TAR_SUFFIX) and e.get("type") != "directory":  # opening a FIFO would block forever
            log.warning("not a regular file (FIFO, device or socket?); skipped: %s", loc.child(n).url)
    markers = {n.removesuffix(MARKER_SUFFIX) for n in entries if is_marker(n)}
    if committed_only and (markers or PLAN_FILE in entries):
        done = [n for n in tars if n.removesuffix(TAR_SUFFIX) in markers]
        if len(done) < len(tars):
            log.warning("%s: %d of %d shards have no %s marker (unfinished build?); they are not used", loc.url,
                        len(tars) - len(done), len(tars), MARKER_SUFFIX)
        tars = done
    return [loc.child(n).url for n in tars]


def _expand_one(spec: str, committed_only: bool) -> list[str] | None:
    """The shards ``spec`` names; ``None`` when nothing exists there."""
    if spec.startswith("pipe:"):
        return [spec]
    loc = resolve(spec)
    if glob.has_magic(loc.path):
        matches = [Location(loc._url_of(p), loc.fs, p) for p in sorted(loc.fs.glob(loc.path))]
        regular = [m.url for m in matches if m.isfile()]
        for m in matches:
            if m.url not in regular and not m.isdir():
                log.warning("not a regular file (FIFO, device or socket?); skipped: %s", m.url)
        return regular if matches else None
    if loc.isdir():
        found = folder_shards(loc, committed_only)
        if not found:
            what = "no committed shards (*.tar with a _stats.json marker)" if committed_only else "no .tar shards"
            raise ShardSpecError(f"folder {loc.url} has {what}")
        return found
    if loc.isfile():
        return [loc.url]
    if loc.exists():
        log.warning("not a regular file (FIFO, device or socket?); skipped: %s", loc.url)
        return []
    return None


def resolve_shards(specs: str | Sequence[str], *, committed_only: bool = False) -> list[str]:
    """Shard URLs (local absolute paths or ``proto://`` URLs) named by ``specs``; duplicates dropped.

    Args:
        specs: one spec or several (see the module docstring).
        committed_only: in build folders, take only committed shards (the trainer's rule).

    Raises:
        ShardSpecError: one line naming every spec that matched nothing (a brace pattern names its missing files).
        cnc.base.errors.LocationError: a URL scheme no backend handles.
    """
    items = [specs] if isinstance(specs, str) else [str(s) for s in specs]
    out: list[str] = []
    missing: list[str] = []
    named = 0
    for item in items:
        for spec in str(item).split("::"):
            expanded = _expand_braces(spec)
            named += len(expanded)
            for one in expanded:
                found = _expand_one(one, committed_only)
                if found is None:
                    missing.append(one)
                else:
                    out += found
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardSpecError(f"{len(missing)} of the {named} tars (or folders, globs) named by "
                             f"{', '.join(items)} are missing (no such shard, folder or glob match): {shown}")
    if not out:
        raise ShardSpecError(f"no shards in {', '.join(items) or '(nothing given)'}")
    return list(dict.fromkeys(out))

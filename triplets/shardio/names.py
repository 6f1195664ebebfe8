"""Every name a build writes, derived in one place, and WebDataset's split of member names.

A build folder (local or object-store prefix)::

    OUT/plan.json  OUT/config.yaml  OUT/manifest.json  OUT/.lock
    OUT/NNNNNN.tar            shard
    OUT/errors/NNNNNN.jsonl   failed samples of shard N (written before the marker)
    OUT/NNNNNN_stats.json     the marker, written last: the commit point

Temporaries are ``<final name>.<12 hex>.tmp`` (:func:`cnc.base.location.temp_name`), so shard globs never match
them. :func:`owned_shard_file` recognises exactly the names the project writes — recovery deletes nothing else.
"""

from __future__ import annotations

import re

from cnc.base.location import TEMP_NAME

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
PROBE_PREFIX = ".probe-"
ERRORS_DIR = "errors"
TAR_SUFFIX = ".tar"
MARKER_SUFFIX = "_stats.json"
ERRORS_SUFFIX = ".jsonl"
SHARD_DIGITS = 6

_TAR = re.compile(r"^(\d{6})\.tar$")
_MARKER = re.compile(r"^(\d{6})_stats\.json$")
_ERRORS = re.compile(r"^(\d{6})\.jsonl$")
#: WebDataset's split of a member name: the suffix starts at the first dot of the basename.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def shard_name(shard: int) -> str:
    """``7`` → ``"000007"`` (brace-expandable: ``{000000..000041}.tar``)."""
    return f"{shard:0{SHARD_DIGITS}d}"


def tar_name(shard: int) -> str:
    return shard_name(shard) + TAR_SUFFIX


def marker_name(shard: int) -> str:
    return shard_name(shard) + MARKER_SUFFIX


def errors_name(shard: int) -> str:
    """Relative to the build folder: ``errors/NNNNNN.jsonl``."""
    return f"{ERRORS_DIR}/{shard_name(shard)}{ERRORS_SUFFIX}"


def marker_for_tar(url: str) -> str:
    """``…/000123.tar`` → ``…/000123_stats.json``."""
    return url.removesuffix(TAR_SUFFIX) + MARKER_SUFFIX


def errors_for_tar(url: str) -> str:
    """``…/000123.tar`` → ``…/errors/000123.jsonl``."""
    head, _, name = url.rpartition("/")
    return f"{head}/{ERRORS_DIR}/{name.removesuffix(TAR_SUFFIX)}{ERRORS_SUFFIX}"


def tar_for_marker(url: str) -> str:
    return url.removesuffix(MARKER_SUFFIX) + TAR_SUFFIX


def shard_of(name: str) -> int | None:
    """The shard id of a shard tar or marker name, else ``None``."""
    m = _TAR.match(name) or _MARKER.match(name)
    return int(m.group(1)) if m else None


def is_marker(name: str) -> bool:
    return bool(_MARKER.match(name))


def owned_shard_file(name: str, folder: str = "") -> tuple[int, bool] | None:
    """``(shard, is_temporary)`` when ``name`` (in ``folder``: ``""`` or ``"errors"``) is a file a build writes.

    Top level: ``NNNNNN.tar``, ``NNNNNN_stats.json`` and their temporaries; ``errors/``: ``NNNNNN.jsonl`` and its
    temporaries. Anything else — ``123456_notes.txt``, ``errors/424242_mine.txt`` — is not ours.
    """
    tmp = TEMP_NAME.match(name)
    base = tmp.group("final") if tmp else name
    patterns = (_ERRORS,) if folder == ERRORS_DIR else (_TAR, _MARKER)
    for pat in patterns:
        m = pat.match(base)
        if m:
            return int(m.group(1)), bool(tmp)
    return None


def owned_temp_file(name: str) -> bool:
    """A temporary of a top-level build file (``plan.json.<hex>.tmp``...)."""
    tmp = TEMP_NAME.match(name)
    return bool(tmp) and tmp.group("final") in (PLAN_FILE, MANIFEST_FILE, CONFIG_FILE)


def split_member(name: str) -> tuple[str | None, str | None]:
    """``"a/b.mask.png"`` → ``("a/b", "mask.png")``, as WebDataset groups members (suffix lower-cased)."""
    m = _KEY_SUFFIX.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)

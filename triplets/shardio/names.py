"""Every name a build writes, derived in one place, and WebDataset's split of member names.

A build folder (local or object-store prefix) holds only shards at its top level, so that readers given the *folder*
(Ray Data's ``read_webdataset``, Hugging Face ``datasets``) see nothing but tars; every sidecar lives under ``_cnc/``
(names starting with ``_`` or ``.`` are skipped by Ray Data's listing)::

    OUT/NNNNNN.tar                  shard
    OUT/.huggingface.yaml           dataset-card metadata (configs/data_files, features) for ``datasets``
    OUT/.lock  OUT/.probe-*         build lock, shared-storage probes
    OUT/_cnc/plan.json  OUT/_cnc/config.yaml  OUT/_cnc/manifest.json  OUT/_cnc/README.md (dataset card)
    OUT/_cnc/errors/NNNNNN.jsonl    failed samples of shard N (written before the marker)
    OUT/_cnc/NNNNNN_stats.json      the marker, written last: the commit point
    OUT/_cnc/inspect/               ``cnc inspect``'s default report folder (contact sheets, summary, index.html)

Folders built before this layout (:data:`LEGACY`: sidecars beside the tars, ``OUT/errors/``) stay readable and
resumable: :func:`layout_of` recognises them from one listing and the build keeps writing them the old way.

Temporaries are ``<final name>.<12 hex>.tmp`` (:func:`cnc.base.location.temp_name`), so shard globs never match
them. :func:`owned_shard_file` recognises exactly the names the project writes — recovery deletes nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cnc.base.location import TEMP_NAME

SIDECAR_DIR = "_cnc"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
HF_YAML_FILE = ".huggingface.yaml"
LOCK_FILE = ".lock"
PROBE_PREFIX = ".probe-"
ERRORS_DIR = "errors"
#: ``cnc inspect``'s default report folder, under :data:`SIDECAR_DIR` (never beside the tars).
INSPECT_DIR = "inspect"
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


@dataclass(frozen=True)
class Layout:
    """Where a build folder keeps its sidecars: ``meta`` is the folder of plan/config/manifest/card/markers
    (``""`` = beside the tars, the legacy layout); errors files live in ``meta/errors``."""

    meta: str

    def sidecar(self, name: str) -> str:
        """Relative path of a sidecar file (``plan.json`` → ``_cnc/plan.json``)."""
        return f"{self.meta}/{name}" if self.meta else name

    def marker(self, shard: int) -> str:
        return self.sidecar(marker_name(shard))

    def errors(self, shard: int) -> str:
        return self.sidecar(errors_name(shard))

    @property
    def errors_dir(self) -> str:
        return self.sidecar(ERRORS_DIR)


#: The current layout: sidecars under ``_cnc/``.
CURRENT = Layout(SIDECAR_DIR)
#: Folders written before: sidecars beside the tars.
LEGACY = Layout("")


def layout_of(top_listing) -> Layout:
    """The layout of a build folder from the names of its top level (a new/empty folder gets :data:`CURRENT`)."""
    names = set(top_listing)
    if SIDECAR_DIR not in names and (PLAN_FILE in names or MANIFEST_FILE in names or any(map(is_marker, names))):
        return LEGACY
    return CURRENT


def _split(url: str) -> tuple[str, str]:
    head, _, name = url.rpartition("/")
    return head, name.removesuffix(TAR_SUFFIX)


def marker_for_tar(url: str, layout: Layout = CURRENT) -> str:
    """``…/000123.tar`` → ``…/_cnc/000123_stats.json`` (``…/000123_stats.json`` with :data:`LEGACY`)."""
    head, stem = _split(url)
    return f"{head}/{layout.sidecar(stem + MARKER_SUFFIX)}" if head else layout.sidecar(stem + MARKER_SUFFIX)


def marker_candidates(url: str) -> list[str]:
    """The marker of a tar in the current layout, then in the legacy one (readers try both)."""
    return [marker_for_tar(url, CURRENT), marker_for_tar(url, LEGACY)]


def errors_for_tar(url: str, layout: Layout = CURRENT) -> str:
    """``…/000123.tar`` → ``…/_cnc/errors/000123.jsonl`` (``…/errors/000123.jsonl`` with :data:`LEGACY`)."""
    head, stem = _split(url)
    rel = layout.sidecar(f"{ERRORS_DIR}/{stem}{ERRORS_SUFFIX}")
    return f"{head}/{rel}" if head else rel


def tar_for_marker(name: str) -> str:
    """A marker's basename → its tar's basename (the tar is always at the top level)."""
    return name.rsplit("/", 1)[-1].removesuffix(MARKER_SUFFIX) + TAR_SUFFIX


def shard_of(name: str) -> int | None:
    """The shard id of a shard tar or marker name, else ``None``."""
    m = _TAR.match(name) or _MARKER.match(name)
    return int(m.group(1)) if m else None


def is_marker(name: str) -> bool:
    return bool(_MARKER.match(name))


def owned_shard_file(name: str, kinds: str = "tar,marker") -> tuple[int, bool] | None:
    """``(shard, is_temporary)`` when ``name`` is a file a build writes of one of ``kinds`` (``tar``, ``marker``,
    ``errors``: which ones a folder holds depends on the layout).

    ``NNNNNN.tar``, ``NNNNNN_stats.json``, ``NNNNNN.jsonl`` and their temporaries. Anything else —
    ``123456_notes.txt``, ``errors/424242_mine.txt`` — is not ours.
    """
    tmp = TEMP_NAME.match(name)
    base = tmp.group("final") if tmp else name
    table = {"tar": _TAR, "marker": _MARKER, "errors": _ERRORS}
    patterns = tuple(table[k] for k in kinds.split(","))
    for pat in patterns:
        m = pat.match(base)
        if m:
            return int(m.group(1)), bool(tmp)
    return None


def owned_temp_file(name: str) -> bool:
    """A temporary of a sidecar file (``plan.json.<hex>.tmp``...)."""
    tmp = TEMP_NAME.match(name)
    return bool(tmp) and tmp.group("final") in (PLAN_FILE, MANIFEST_FILE, CONFIG_FILE, CARD_FILE, HF_YAML_FILE)


def split_member(name: str) -> tuple[str | None, str | None]:
    """``"a/b.mask.png"`` → ``("a/b", "mask.png")``, as WebDataset groups members (suffix lower-cased)."""
    m = _KEY_SUFFIX.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)

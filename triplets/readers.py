"""Input readers: turn an input path into a sorted list of source items.

An item is a plain dict (JSON-serialisable, so it goes into ``plan.json``)::

    {"key": "dogs/001", "source": "/data/dogs/001.jpg", "caption": "a dog",
     "mask_path": "/data/masks/dogs/001.png" | None, "mask_kind": "binary" | "cocostuff" | None}

Sources are file paths or ``TAR#MEMBER`` references into WebDataset shards.

Supported inputs (detected from the path, or forced with ``input_format``):

* ``folder`` — a folder of images. Captions come from ``captions.jsonl`` (``{"key"|"file": ..,
  "caption": ..}``; key = path relative to the folder with or without extension), or
  ``captions.txt`` with ``uid:caption`` lines (split on the *first* colon, so captions keep
  theirs), or a ``.txt`` file beside each image. Optional dataset masks in ``masks/`` with the
  same relative path and a ``.png`` extension.
* ``coco`` — a COCO captions JSON (``captions_train2017.json``); images are looked up in
  ``<root>/<split>/`` where the split is taken from the file name; the first caption (lowest
  annotation id) is used, as the reference. COCO-Stuff ``stuffthingmaps_trainval2017/<split>/``
  next to the images provides ``cocostuff`` dataset masks when present.
* ``webdataset`` — a ``.tar`` file, a brace pattern (``data/{000..009}.tar``) or a folder of
  tars with ``jpg``/``png``/``webp`` + ``txt`` members (img2dataset output).
"""

from __future__ import annotations

import functools
import json
import logging
import tarfile
from pathlib import Path

from triplets.sample import make_key

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FORMATS = ("folder", "coco", "webdataset", "pickapic")


class InputError(ValueError):
    """The input path cannot be read as the requested format."""


def detect_format(path: str) -> str:
    """``folder`` | ``coco`` | ``webdataset`` from the shape of ``path``."""
    if "{" in path or path.endswith(".tar"):
        return "webdataset"
    if path.endswith(".parquet"):
        return "pickapic"  # Pick-a-Pic v1 parquet (triplets.readers_pickapic)
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return "coco"
    if p.is_dir():
        has_images = any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.rglob("*") if f.is_file())
        if not has_images and any(p.glob("*.tar")):
            return "webdataset"
        return "folder"
    raise InputError(f"input {path!r} does not exist or is not a folder, a COCO .json or a .tar/brace pattern")


def read_items(path: str, input_format: str = "auto") -> list[dict]:
    """All source items of ``path``, sorted by key; duplicate keys are an error."""
    fmt = detect_format(path) if input_format == "auto" else input_format
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; valid: {', '.join(FORMATS)}")
    items = {"folder": _read_folder, "coco": _read_coco, "webdataset": _read_webdataset,
             "pickapic": _read_pickapic}[fmt](path)
    items.sort(key=lambda it: it["key"])
    seen: set[str] = set()
    for it in items:
        if it["key"] in seen:
            raise InputError(f"two inputs map to the same sample key {it['key']!r}; rename one of them")
        seen.add(it["key"])
    log.info("read %d items from %s (%s)", len(items), path, fmt)
    return items


def _read_pickapic(path: str) -> list[dict]:
    from triplets.readers_pickapic import read_pickapic  # Pick-a-Pic v1 parquet; own module
    return read_pickapic(path)


def _item(key: str, source: str, caption: str, mask: str | None = None, mask_kind: str | None = None) -> dict:
    return {"key": key, "source": source, "caption": caption, "mask_path": mask, "mask_kind": mask_kind}


def _folder_captions(root: Path) -> dict[str, str]:
    caps: dict[str, str] = {}
    jl = root / "captions.jsonl"
    if jl.is_file():
        for n, line in enumerate(jl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                caps[str(row.get("key", row.get("file")))] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, AttributeError):
                log.warning("%s:%d: not a {key, caption} JSON line; skipped", jl, n)
    txt = root / "captions.txt"
    if txt.is_file():
        for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if ":" not in line:
                log.warning("%s:%d: no 'uid:caption' separator; skipped", txt, n)
                continue
            uid, cap = line.split(":", 1)
            caps[uid.strip()] = cap.strip()
    return caps


def _read_folder(path: str) -> list[dict]:
    root = Path(path)
    caps = _folder_captions(root)
    items, missing = [], 0
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS or "masks" in f.relative_to(root).parts[:1]:
            continue
        rel = f.relative_to(root).as_posix()
        stem = rel.rsplit(".", 1)[0]
        caption = caps.get(rel, caps.get(stem, caps.get(f.stem)))
        if caption is None and f.with_suffix(".txt").is_file():
            caption = f.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if caption is None:
            missing += 1
            caption = ""
        mask = root / "masks" / (stem + ".png")
        items.append(_item(make_key(rel), str(f), caption, str(mask) if mask.is_file() else None,
                           "binary" if mask.is_file() else None))
    if missing:
        log.warning("%d images in %s have no caption; they get an empty caption", missing, root)
    return items


def _read_coco(path: str) -> list[dict]:
    ann_path = Path(path)
    data = json.loads(ann_path.read_text(encoding="utf-8"))
    split = ann_path.stem.split("_")[-1]
    candidates = [ann_path.parent.parent / split, ann_path.parent / split, ann_path.parent.parent / "images" / split]
    images_dir = next((c for c in candidates if c.is_dir()), None)
    if images_dir is None:
        raise InputError(f"COCO images for split {split!r} not found in any of {[str(c) for c in candidates]}")
    stuff_dir = next((c for c in (images_dir.parent / "stuffthingmaps_trainval2017" / split,
                                  ann_path.parent.parent / "stuffthingmaps_trainval2017" / split) if c.is_dir()), None)
    first: dict[int, tuple[int, str]] = {}
    for ann in data.get("annotations", []):
        img_id, ann_id = int(ann["image_id"]), int(ann.get("id", 0))
        if img_id not in first or ann_id < first[img_id][0]:
            first[img_id] = (ann_id, " ".join(str(ann["caption"]).split()))
    items, absent = [], 0
    for img in data.get("images", []):
        img_id = int(img["id"])
        f = images_dir / img["file_name"]
        if not f.is_file():
            absent += 1
            continue
        key = f"{img_id:012d}"
        mask = stuff_dir / f"{key}.png" if stuff_dir else None
        has_mask = mask is not None and mask.is_file()
        items.append(_item(key, str(f), first.get(img_id, (0, ""))[1], str(mask) if has_mask else None,
                           "cocostuff" if has_mask else None))
    if absent:
        log.warning("%d COCO images listed in %s are not on disk; skipped", absent, ann_path)
    return items


def expand_shards(path: str) -> list[str]:
    """Brace-expand a shard pattern or list the tars of a folder (sorted)."""
    import braceexpand

    p = Path(path)
    if p.is_dir():
        return sorted(str(t) for t in p.glob("*.tar"))
    return list(braceexpand.braceexpand(path))


def _read_webdataset(path: str) -> list[dict]:
    items = []
    for tar in expand_shards(path):
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(tar) as tf:
            for m in tf:
                if not m.isfile() or "." not in Path(m.name).name:
                    continue
                base, name = m.name.rsplit("/", 1) if "/" in m.name else ("", m.name)
                key, ext = name.split(".", 1)
                members.setdefault(f"{base}/{key}" if base else key, {})[ext.lower()] = m
            for key, exts in members.items():
                img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in exts), None)
                if img_ext is None:
                    continue
                caption = ""
                if "txt" in exts:
                    caption = tf.extractfile(exts["txt"]).read().decode("utf-8", "replace").strip()
                source_id = f"{Path(tar).stem}/{key}"
                items.append(_item(make_key(source_id), f"{tar}#{exts[img_ext].name}", caption))
    return items


@functools.lru_cache(maxsize=8)
def _open_tar_index(tar: str) -> dict[str, tuple[int, int]]:
    with tarfile.open(tar) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}


def read_source_bytes(source: str) -> bytes:
    """Bytes of a file path, a ``TAR#MEMBER`` or a ``PARQUET#COLUMN/ROW`` (Pick-a-Pic) reference."""
    if "#" in source and source.split("#", 1)[0].endswith(".parquet"):
        from triplets.readers_pickapic import read_parquet_cell
        return read_parquet_cell(source)
    if "#" in source and source.split("#", 1)[0].endswith(".tar"):
        tar, member = source.split("#", 1)
        offset, size = _open_tar_index(tar)[member]
        with open(tar, "rb") as f:
            f.seek(offset)
            return f.read(size)
    with open(source, "rb") as f:
        return f.read()

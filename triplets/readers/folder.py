"""``folder`` inputs: a folder of images, on local disk or object storage.

Captions come from ``captions.jsonl`` (``{"key"|"file": .., "caption": ..}``; key = path relative to the folder
with or without extension), or ``captions.txt`` with ``uid:caption`` lines (split on the *first* colon, so captions
keep theirs), or a ``.txt`` file beside each image. Optional dataset masks in ``masks/`` with the same relative path
and a ``.png`` extension. On object storage the folder is listed once (recursively); captions files are read, images
never (the workers read each source directly).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cnc.base import jsonio
from cnc.base.location import Location, is_url, resolve
from triplets.readers.base import (
    IMAGE_EXTENSIONS,
    InputError,
    InputFormat,
    ItemWarnings,
    ReadOptions,
    Where,
    inside,
    is_utf8,
    make_item,
    printable,
    text_lines,
)
from triplets.sample import make_key

log = logging.getLogger(__name__)
CAPTION_FILES = ("captions.jsonl", "captions.txt")


def folder_captions(root: Path | Location, warn: ItemWarnings) -> dict[str, str]:
    """Captions of a folder (local or on object storage) from ``captions.jsonl`` and ``captions.txt``."""
    caps: dict[str, str] = {}
    where: dict[str, str] = {}

    def put(key: str, caption: str, origin: str) -> None:
        if key in caps:
            warn("duplicate caption key", "%s: caption key %r repeats %s; the later caption is used", origin, key,
                 where[key])
        caps[key], where[key] = caption, origin

    for name in CAPTION_FILES:
        loc = root.child(name) if isinstance(root, Location) else resolve(root / name)
        if not loc.isfile():
            continue
        for n, line in text_lines(loc.read_bytes(), loc.url, warn):
            if name.endswith(".txt"):
                if ":" not in line:
                    warn("bad caption line", "%s:%d: no 'uid:caption' separator; skipped", loc.url, n)
                    continue
                uid, cap = line.split(":", 1)
                put(uid.strip(), cap.strip(), f"{name}:{n}")
                continue
            try:
                row = jsonio.loads(line, what="captions.jsonl row")
            except ValueError:  # not JSON, too big or too deep (jsonio)
                row = None
            key = row.get("key", row.get("file")) if isinstance(row, dict) else None
            caption = row.get("caption") if isinstance(row, dict) else None
            if not isinstance(key, str) or not key:
                warn("bad caption line", "%s:%d: not a {key, caption} JSON object with a string key; skipped",
                     loc.url, n)
            elif not isinstance(caption, str):
                warn("bad caption line", "%s:%d: caption of %r is %s, not a string; skipped", loc.url, n, key,
                     "null" if caption is None else type(caption).__name__)
            else:
                put(key, caption, f"{name}:{n}")
    return caps


def _side_caption(f: Path, warn: ItemWarnings) -> str | None:
    side = f.with_suffix(".txt")
    if not side.is_file():
        return None
    try:
        return side.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        warn("caption file not UTF-8", "%s: not UTF-8 (byte %d); the image gets no caption", side, exc.start)
    except OSError as exc:
        warn("caption file unreadable", "%s: unreadable (%s); the image gets no caption", side, exc.strerror)
    return None


def _local_items(root: Path, warn: ItemWarnings, allow_outside_input: bool) -> list[dict]:
    caps = folder_captions(root, warn)
    items, missing = [], 0
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() not in IMAGE_EXTENSIONS or "masks" in f.relative_to(root).parts[:1] or not f.is_file():
            continue
        rel = f.relative_to(root).as_posix()
        if not is_utf8(rel):
            warn("file name not UTF-8", "%s: file name is not valid UTF-8; skipped (rename it)", printable(str(f)))
            continue
        if not allow_outside_input and not inside(f, root):
            warn("outside the input", "%s: links outside the input folder (to %s); skipped "
                 "(allow_outside_input=true to follow)", f, f.resolve())
            continue
        stem = rel.rsplit(".", 1)[0]
        caption = caps.get(rel, caps.get(stem, caps.get(f.stem)))
        if caption is None:
            caption = _side_caption(f, warn)
        if caption is None:
            missing += 1
            caption = ""
        mask = root / "masks" / (stem + ".png")
        has_mask = mask.is_file()
        if has_mask and not allow_outside_input and not inside(mask, root):
            warn("outside the input", "%s: mask links outside the input folder; the image is used without it", mask)
            has_mask = False
        items.append(make_item(make_key(rel), str(f), caption, str(mask) if has_mask else None,
                               "binary" if has_mask else None))
    if missing:
        log.warning("%d images in %s have no caption; they get an empty caption", missing, root)
    return items


def _remote_items(root: Location, warn: ItemWarnings) -> list[dict]:
    """A folder of images on object storage: one recursive listing; captions files read, images never."""
    base = root.path.rstrip("/")
    files = {p[len(base) + 1:] for p in root.fs.find(base)}
    caps = folder_captions(root, warn)
    items, missing = [], 0
    for rel in sorted(files):
        if not rel.lower().endswith(IMAGE_EXTENSIONS) or rel.split("/", 1)[0] == "masks":
            continue
        stem = rel.rsplit(".", 1)[0]
        caption = caps.get(rel, caps.get(stem, caps.get(stem.rsplit("/", 1)[-1])))
        if caption is None and stem + ".txt" in files:
            try:
                caption = root.child(stem + ".txt").read_bytes().decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                warn("caption file not UTF-8", "%s.txt: not UTF-8 (byte %d); the image gets no caption", stem,
                     exc.start)
        if caption is None:
            missing += 1
            caption = ""
        mask = f"masks/{stem}.png"
        has_mask = mask in files
        items.append(make_item(make_key(rel), root.child(rel).url, caption,
                               root.child(mask).url if has_mask else None, "binary" if has_mask else None))
    if missing:
        log.warning("%d images in %s have no caption; they get an empty caption", missing, root.url)
    return items


class FolderFormat(InputFormat):
    """A folder of images (module docstring); planned as an item list."""

    name = "folder"

    def check_shape(self, path: str) -> None:
        if not Where(path).is_dir():
            raise InputError(f"input_format=folder needs a folder, {path!r} is not one")

    def list_items(self, path: str, warn: ItemWarnings, options: ReadOptions) -> list[dict]:
        if is_url(path):
            return _remote_items(resolve(path), warn)
        return _local_items(Path(path), warn, options.allow_outside_input)


FORMAT = FolderFormat()

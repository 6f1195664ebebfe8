"""``coco`` inputs: a COCO captions JSON (``captions_train2017.json``), on local disk or object storage.

Images are looked up in ``<root>/<split>/`` where the split is taken from the file name; each image's caption is its
first annotation in file order with newlines turned into spaces, as the reference (``data/parse_cocostuff.py``).
COCO-Stuff ``stuffthingmaps_trainval2017/<split>/`` next to the images provides ``cocostuff`` dataset masks when
present. On object storage image existence comes from one listing of the split folder.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path

from cnc.base import jsonio
from cnc.base.location import Location, is_url, resolve
from triplets.readers.base import InputError, InputFormat, ItemWarnings, ReadOptions, Where, inside, make_item

log = logging.getLogger(__name__)


def _coco_id(value) -> int | None:
    """A COCO id as int (ints, or strings of digits), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def first_captions(data: dict, warn: ItemWarnings, where: str) -> dict[int, str]:
    """image id → its caption, by the reference's rule (``data/parse_cocostuff.py``): the **first annotation in
    file order** for the image, with ``\\n`` and ``\\r`` replaced by a space (nothing else changed)."""
    first: dict[int, str] = {}
    for n, ann in enumerate(data.get("annotations", [])):
        img_id = _coco_id(ann.get("image_id")) if isinstance(ann, dict) else None
        caption = ann.get("caption") if isinstance(ann, dict) else None
        if img_id is None or not isinstance(caption, str):
            warn("bad COCO annotation", "%s: annotations[%d] lacks an integer image_id or a string caption; "
                 "skipped", where, n)
            continue
        if img_id not in first:
            first[img_id] = caption.replace("\n", " ").replace("\r", " ")
    return first


def _coco_data(ann: Location) -> dict:
    try:
        data = jsonio.loads(ann.read_bytes(), what=f"COCO captions file {ann.name}", max_bytes=None)
    except ValueError as exc:  # not UTF-8, not JSON, nested too deep (jsonio)
        raise InputError(f"{ann.url}: not a usable UTF-8 JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise InputError(f"{ann.url}: not a COCO captions file (expected an object with 'images' and 'annotations' "
                         f"lists, got {type(data).__name__})")
    return data


def _local_items(path: str, warn: ItemWarnings, allow_outside_input: bool) -> list[dict]:
    ann_path = Path(path)
    data = _coco_data(resolve(path))
    split = ann_path.stem.split("_")[-1]
    candidates = [ann_path.parent.parent / split, ann_path.parent / split, ann_path.parent.parent / "images" / split]
    images_dir = next((c for c in candidates if c.is_dir()), None)
    if images_dir is None:
        raise InputError(f"COCO images for split {split!r} not found in any of {[str(c) for c in candidates]}")
    stuff_dir = next((c for c in (images_dir.parent / "stuffthingmaps_trainval2017" / split,
                                  ann_path.parent.parent / "stuffthingmaps_trainval2017" / split) if c.is_dir()), None)
    first = first_captions(data, warn, path)
    items, absent = [], 0
    for n, img in enumerate(data["images"]):
        img_id = _coco_id(img.get("id")) if isinstance(img, dict) else None
        name = img.get("file_name") if isinstance(img, dict) else None
        if img_id is None or not isinstance(name, str) or not name:
            warn("bad COCO image", "%s: images[%d] lacks an integer id or a file_name; skipped", path, n)
            continue
        f = images_dir / name
        if not allow_outside_input and not inside(f, images_dir):
            warn("outside the input", "%s: images[%d] file_name %r points outside %s; skipped "
                 "(allow_outside_input=true to follow)", path, n, name, images_dir)
            continue
        if not f.is_file():
            absent += 1
            continue
        key = f"{img_id:012d}"
        mask = stuff_dir / f"{key}.png" if stuff_dir else None
        has_mask = mask is not None and mask.is_file()
        items.append(make_item(key, str(f), first.get(img_id, ""), str(mask) if has_mask else None,
                               "cocostuff" if has_mask else None))
    if absent:
        log.warning("%d COCO images listed in %s are not on disk; skipped", absent, ann_path)
    return items


def _remote_items(ann: Location, warn: ItemWarnings) -> list[dict]:
    """COCO on object storage: the same rules as on disk; image existence from one listing of the split."""
    data = _coco_data(ann)
    split = posixpath.splitext(ann.name)[0].split("_")[-1]
    root = ann.parent.parent
    candidates = [root.child(split), ann.parent.child(split), root.child("images", split)]
    images_dir = next((c for c in candidates if c.isdir()), None)
    if images_dir is None:
        raise InputError(f"COCO images for split {split!r} not found in any of {[c.url for c in candidates]}")
    present = set(images_dir.list())
    stuff_dir = next((c for c in (images_dir.parent.child("stuffthingmaps_trainval2017", split),
                                  root.child("stuffthingmaps_trainval2017", split)) if c.isdir()), None)
    stuff = set(stuff_dir.list()) if stuff_dir else set()
    first = first_captions(data, warn, ann.url)
    items, absent = [], 0
    for n, img in enumerate(data["images"]):
        img_id = _coco_id(img.get("id")) if isinstance(img, dict) else None
        name = img.get("file_name") if isinstance(img, dict) else None
        if img_id is None or not isinstance(name, str) or not name or "/" in name or name.startswith(".."):
            warn("bad COCO image", "%s: images[%d] lacks an integer id or a plain file_name; skipped", ann.url, n)
            continue
        if name not in present:
            absent += 1
            continue
        key = f"{img_id:012d}"
        has_mask = f"{key}.png" in stuff
        items.append(make_item(key, images_dir.child(name).url, first.get(img_id, ""),
                               stuff_dir.child(f"{key}.png").url if has_mask else None,
                               "cocostuff" if has_mask else None))
    if absent:
        log.warning("%d COCO images listed in %s are not in %s; skipped", absent, ann.url, images_dir.url)
    return items


class CocoFormat(InputFormat):
    """A COCO captions file (module docstring); planned as an item list."""

    name = "coco"

    def check_shape(self, path: str) -> None:
        p = Where(path)
        if not (p.is_file() and p.suffix.lower() == ".json"):
            raise InputError(f"input_format=coco needs a COCO captions .json file, {path!r} is not one")

    def list_items(self, path: str, warn: ItemWarnings, options: ReadOptions) -> list[dict]:
        if is_url(path):
            return _remote_items(resolve(path), warn)
        return _local_items(path, warn, options.allow_outside_input)


FORMAT = CocoFormat()

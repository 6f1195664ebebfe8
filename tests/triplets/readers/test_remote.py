"""Readers on an fsspec filesystem (``memory://`` stands in for s3/gs here; the S3 journey is test_storage_s3.py)."""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import numpy as np
import pytest

from cnc.base.errors import LocationError
from triplets.readers import InputError, detect_format, read_items, read_source_bytes


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def mem():
    fs = fsspec.filesystem("memory")
    root = "/cnc-remote-readers"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    yield fs, root
    fs.rm(root, recursive=True)


def test_folder_on_object_storage(mem):
    fs, root = mem
    fs.pipe(f"{root}/photos/a.jpg", _jpeg(0))
    fs.pipe(f"{root}/photos/sub/b.png", _jpeg(1))
    fs.pipe(f"{root}/photos/sub/b.txt", b"side caption")
    fs.pipe(f"{root}/photos/masks/a.png", _jpeg(2))
    fs.pipe(f"{root}/photos/captions.jsonl", b'{"key": "a", "caption": "a cat"}\n[1, 2]\n')
    url = f"memory://{root}/photos"
    assert detect_format(url) == "folder"
    items = read_items(url)
    by_key = {it["key"]: it for it in items}
    assert by_key["a"]["caption"] == "a cat" and by_key["a"]["mask_path"].endswith("/photos/masks/a.png")
    assert by_key["sub/b"]["caption"] == "side caption" and by_key["sub/b"]["mask_path"] is None
    assert by_key["a"]["source"].startswith("memory://")
    assert read_source_bytes(by_key["a"]["source"]) == _jpeg(0)


def test_coco_and_tars_on_object_storage(mem):
    fs, root = mem
    fs.pipe(f"{root}/coco/train2017/000000000001.jpg", _jpeg(3))
    fs.pipe(f"{root}/coco/annotations/captions_train2017.json", json.dumps({
        "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "gone.jpg"}],
        "annotations": [{"image_id": 1, "id": 9, "caption": "first\nin file"}, {"image_id": 1, "id": 3, "caption": "x"}],
    }).encode())
    url = f"memory://{root}/coco/annotations/captions_train2017.json"
    assert detect_format(url) == "coco"
    [item] = read_items(url)
    assert item["key"] == "000000000001" and item["caption"] == "first in file"
    assert read_source_bytes(item["source"]) == _jpeg(3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("x.jpg", _jpeg(4)), ("x.txt", b"tar caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    fs.pipe(f"{root}/wds/00000.tar", buf.getvalue())
    [item] = read_items(f"memory://{root}/wds/{{00000..00000}}.tar")
    assert item["caption"] == "tar caption" and read_source_bytes(item["source"]) == _jpeg(4)
    with pytest.raises(InputError):
        read_items(f"memory://{root}/nothing-here")


def test_unknown_scheme_is_a_location_error():
    with pytest.raises(LocationError, match="unknown URL scheme"):
        read_items("nosuchscheme://bucket/photos")

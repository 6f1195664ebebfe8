"""``coco`` inputs (:mod:`triplets.readers.coco`): the reference's caption rule, present images, COCO-Stuff masks,
malformed files refused, bad entries skipped per item, object storage.

The "first caption" rule (issue 14, item 6), stated precisely: the reference (``data/parse_cocostuff.py``) takes the
**first annotation in file order** for the image, whatever the annotation ids; only ``\\n`` and ``\\r`` are replaced
by a space (runs and ends kept).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import jpeg_bytes
from triplets.readers import InputError, detect_format, read_items, read_source_bytes


def test_coco_reader_first_caption_present_images_and_stuff_masks(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    stuff = tmp_path / "stuffthingmaps_trainval2017" / "train2017"
    stuff.mkdir(parents=True)
    (tmp_path / "train2017" / "000000000009.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "train2017" / "000000000025.jpg").write_bytes(jpeg_bytes())
    Image.fromarray(np.full((80, 96), 255, np.uint8)).save(stuff / "000000000009.png")
    ann = {
        "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"},
                   {"id": 30, "file_name": "000000000030.jpg"}],
        "annotations": [{"id": 7, "image_id": 9, "caption": "second\ncaption"},
                        {"id": 3, "image_id": 9, "caption": "the  first caption"},
                        {"id": 5, "image_id": 25, "caption": "only one"}],
    }
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps(ann))
    assert detect_format(str(path)) == "coco"
    items = read_items(str(path))
    assert [it["key"] for it in items] == ["000000000009", "000000000025"]  # 30 is not on disk
    assert items[0]["caption"] == "second caption"  # first in file order, newline → space (the reference's rule)
    assert items[0]["mask_kind"] == "cocostuff" and items[1]["mask_path"] is None


def _coco_one_image_three_captions(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    (tmp_path / "train2017" / "000000000009.jpg").write_bytes(buf.getvalue())
    ann = {"images": [{"id": 9, "file_name": "000000000009.jpg"}],
           "annotations": [{"id": 40, "image_id": 9, "caption": "listed first,\nhigher id "},
                           {"id": 12, "image_id": 9, "caption": " lowest  id\ncaption"},
                           {"id": 25, "image_id": 9, "caption": "middle id"}]}
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps(ann))
    return str(path)


def test_reference_rule_first_in_file_order(tmp_path):
    (item,) = read_items(_coco_one_image_three_captions(tmp_path))
    assert item["caption"] == "listed first, higher id "


# -- COCO -------------------------------------------------------------------------------------------------------
def _coco(tmp_path: Path, data) -> Path:
    (tmp_path / "annotations").mkdir(parents=True, exist_ok=True)
    (tmp_path / "train2017").mkdir(exist_ok=True)
    for i in (1, 2, 3):
        (tmp_path / "train2017" / f"{i:012d}.jpg").write_bytes(jpeg_bytes(i))
    ann = tmp_path / "annotations" / "captions_train2017.json"
    ann.write_text(json.dumps(data))
    return ann


@pytest.mark.parametrize("data", [[1, 2], {"annotations": []}, "x", {"images": {"id": 1}}])
def test_malformed_coco_json_as_a_whole_is_refused(tmp_path, data):
    with pytest.raises(InputError, match="not a COCO captions file"):
        read_items(str(_coco(tmp_path, data)))


def test_coco_bad_entries_are_skipped_per_item(tmp_path, caplog):
    data = {"images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": "2", "file_name": "000000000002.jpg"},
                       {"id": "three", "file_name": "000000000003.jpg"}, {"id": 4}, "junk",
                       {"id": 5, "file_name": "../outside.jpg"}],
            "annotations": [{"image_id": 1, "id": 10, "caption": "one"}, {"image_id": "2", "id": 11},
                            {"image_id": "x", "id": 12, "caption": "bad id"}, {"image_id": 2, "id": 13, "caption": None},
                            7]}
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(9))
    with caplog.at_level(logging.WARNING):
        items = read_items(str(_coco(tmp_path, data)))
    assert [(it["key"], it["caption"]) for it in items] == [("000000000001", "one"), ("000000000002", "")]
    assert "annotations[1]" in caplog.text and "images[2]" in caplog.text and "images[3]" in caplog.text
    assert "points outside" in caplog.text
    data["images"] = data["images"][-1:]
    items = read_items(str(_coco(tmp_path, data)), allow_outside_input=True)
    assert [it["key"] for it in items] == ["000000000005"]


def test_coco_on_object_storage(memory_fs):
    fs, root = memory_fs
    fs.pipe(f"{root}/coco/train2017/000000000001.jpg", jpeg_bytes(3))
    fs.pipe(f"{root}/coco/annotations/captions_train2017.json", json.dumps({
        "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "gone.jpg"}],
        "annotations": [{"image_id": 1, "id": 9, "caption": "first\nin file"}, {"image_id": 1, "id": 3, "caption": "x"}],
    }).encode())
    url = f"memory://{root}/coco/annotations/captions_train2017.json"
    assert detect_format(url) == "coco"
    [item] = read_items(url)
    assert item["key"] == "000000000001" and item["caption"] == "first in file"
    assert read_source_bytes(item["source"]) == jpeg_bytes(3)
    with pytest.raises(InputError):
        read_items(f"memory://{root}/nothing-here")

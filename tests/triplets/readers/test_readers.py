"""Input readers: folder (jsonl / uid:caption / sidecar txt / masks), COCO (+ COCO-Stuff), WebDataset tars."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from triplets.readers import InputError, detect_format, read_items, read_source_bytes


def _jpeg(seed=0, size=(96, 80)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def test_folder_with_jsonl_captions_and_masks(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(_jpeg(0))
    (tmp_path / "sub" / "b.png").write_bytes(_jpeg(1))
    (tmp_path / "c.v2.jpg").write_bytes(_jpeg(2))
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "masks" / "sub").mkdir(parents=True)
    Image.fromarray(np.full((80, 96), 255, np.uint8)).save(tmp_path / "masks" / "sub" / "b.png")
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"key": "a", "caption": "first: with colon"}) + "\n"
        + json.dumps({"file": "sub/b.png", "caption": "second"}) + "\nnot json\n")
    items = read_items(str(tmp_path))
    assert detect_format(str(tmp_path)) == "folder"
    by_key = {it["key"]: it for it in items}
    assert [it["key"] for it in items] == sorted(by_key)
    assert by_key["a"]["caption"] == "first: with colon"
    assert by_key["sub/b"]["caption"] == "second"
    assert by_key["sub/b"]["mask_path"].endswith("masks/sub/b.png") and by_key["sub/b"]["mask_kind"] == "binary"
    assert by_key["a"]["mask_path"] is None
    dotted = [k for k in by_key if k.startswith("c_v2")]
    assert len(dotted) == 1 and "." not in dotted[0]
    assert not any(k.startswith("masks") for k in by_key)
    assert read_source_bytes(by_key["a"]["source"]) == (tmp_path / "a.jpg").read_bytes()


def test_folder_uid_caption_lines_keep_colons_and_sidecar_txt(tmp_path):
    for name in ("x", "y", "z"):
        (tmp_path / f"{name}.jpg").write_bytes(_jpeg())
    (tmp_path / "captions.txt").write_text("x: a sign reading: STOP\nbroken line without separator\n")
    (tmp_path / "y.txt").write_text("caption from sidecar\n")
    by_key = {it["key"]: it for it in read_items(str(tmp_path))}
    assert by_key["x"]["caption"] == "a sign reading: STOP"
    assert by_key["y"]["caption"] == "caption from sidecar"
    assert by_key["z"]["caption"] == ""


def test_coco_reader_first_caption_present_images_and_stuff_masks(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    stuff = tmp_path / "stuffthingmaps_trainval2017" / "train2017"
    stuff.mkdir(parents=True)
    (tmp_path / "train2017" / "000000000009.jpg").write_bytes(_jpeg())
    (tmp_path / "train2017" / "000000000025.jpg").write_bytes(_jpeg())
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


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_input_img2dataset_style(tmp_path):
    img = _jpeg(3)
    _tar(tmp_path / "00000.tar", [("000000000.jpg", img), ("000000000.txt", b"a cat"), ("000000000.json", b"{}"),
                                  ("000000001.jpg", _jpeg(4)), ("000000001.txt", b"a dog"),
                                  ("000000002.txt", b"caption without image")])
    _tar(tmp_path / "00001.tar", [("000010000.png", _jpeg(5)), ("000010000.txt", b"png one")])
    pattern = str(tmp_path / "{00000..00001}.tar")
    assert detect_format(pattern) == "webdataset"
    items = read_items(pattern)
    assert [it["caption"] for it in items] == ["a cat", "a dog", "png one"]
    assert read_source_bytes(items[0]["source"]) == img
    assert len({it["key"] for it in items}) == 3
    assert [it["key"] for it in read_items(str(tmp_path))] == [it["key"] for it in items]  # folder of tars


def test_forced_format_duplicates_and_missing_input(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "a.png").write_bytes(_jpeg())
    with pytest.raises(InputError, match="same sample key"):
        read_items(str(tmp_path), "folder")
    with pytest.raises(InputError, match="unknown input format"):
        read_items(str(tmp_path), "parquet")
    with pytest.raises(InputError, match="does not exist"):
        read_items(str(tmp_path / "nope"))

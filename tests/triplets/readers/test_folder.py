"""``folder`` inputs (:mod:`triplets.readers.folder`): captions (jsonl / uid:caption / sidecar txt), masks, bad
names and captions skipped per item, symlinks, object storage."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import jpeg_bytes
from triplets.readers import detect_format, read_items, read_source_bytes


def _folder(root: Path, names=("a", "b", "c")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (root / f"{n}.jpg").write_bytes(jpeg_bytes(i))
    return root


def test_folder_with_jsonl_captions_and_masks(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "sub" / "b.png").write_bytes(jpeg_bytes(1))
    (tmp_path / "c.v2.jpg").write_bytes(jpeg_bytes(2))
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
        (tmp_path / f"{name}.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "captions.txt").write_text("x: a sign reading: STOP\nbroken line without separator\n")
    (tmp_path / "y.txt").write_text("caption from sidecar\n")
    by_key = {it["key"]: it for it in read_items(str(tmp_path))}
    assert by_key["x"]["caption"] == "a sign reading: STOP"
    assert by_key["y"]["caption"] == "caption from sidecar"
    assert by_key["z"]["caption"] == ""


def test_folder_on_object_storage(memory_fs):
    fs, root = memory_fs
    fs.pipe(f"{root}/photos/a.jpg", jpeg_bytes(0))
    fs.pipe(f"{root}/photos/sub/b.png", jpeg_bytes(1))
    fs.pipe(f"{root}/photos/sub/b.txt", b"side caption")
    fs.pipe(f"{root}/photos/masks/a.png", jpeg_bytes(2))
    fs.pipe(f"{root}/photos/captions.jsonl", b'{"key": "a", "caption": "a cat"}\n[1, 2]\n')
    url = f"memory://{root}/photos"
    assert detect_format(url) == "folder"
    items = read_items(url)
    by_key = {it["key"]: it for it in items}
    assert by_key["a"]["caption"] == "a cat" and by_key["a"]["mask_path"].endswith("/photos/masks/a.png")
    assert by_key["sub/b"]["caption"] == "side caption" and by_key["sub/b"]["mask_path"] is None
    assert by_key["a"]["source"].startswith("memory://")
    assert read_source_bytes(by_key["a"]["source"]) == jpeg_bytes(0)


# -- captions ---------------------------------------------------------------------------------------------------
def test_bad_jsonl_lines_are_skipped_with_file_and_line(tmp_path, caplog):
    root = _folder(tmp_path / "in")
    lines = ['[1,2]', 'null', '"x"', '{"key": "a", "caption": null}', '{"key": "b", "caption": 5}',
             '{"key": 3, "caption": "k"}', '{"key": "c", "caption": "first"}', '{"key": "c", "caption": "second"}']
    (root / "captions.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"key": "a", "caption": "\xff"}\n')
    with caplog.at_level(logging.WARNING):
        items = {it["key"]: it["caption"] for it in read_items(str(root))}
    assert items == {"a": "", "b": "", "c": "second"}  # a null caption never becomes "None"
    for n in range(1, 7):
        assert f"captions.jsonl:{n}:" in caplog.text
    assert "captions.jsonl:9: not UTF-8" in caplog.text
    assert "'c' repeats captions.jsonl:7" in caplog.text  # duplicate keys warn


def test_non_utf8_captions_txt_and_side_txt(tmp_path, caplog):
    root = _folder(tmp_path / "in")
    (root / "captions.txt").write_bytes(b"a: fine\nb: caf\xe9\n")
    (root / "c.txt").write_bytes(b"\xff\xfe bad")
    with caplog.at_level(logging.WARNING):
        items = {it["key"]: it["caption"] for it in read_items(str(root))}
    assert items == {"a": "fine", "b": "", "c": ""}
    assert "captions.txt:2: not UTF-8" in caplog.text and "c.txt: not UTF-8" in caplog.text


def test_non_utf8_file_name_is_skipped_per_item(tmp_path, caplog):
    root = _folder(tmp_path / "in")
    with open(os.path.join(os.fsencode(root), b"bad\xff.jpg"), "wb") as f:
        f.write(jpeg_bytes(5))
    with caplog.at_level(logging.WARNING):
        items = read_items(str(root))
    assert [it["key"] for it in items] == ["a", "b", "c"]
    assert "not valid UTF-8" in caplog.text and "bad\\xff.jpg" in caplog.text
    json.dumps(items)  # the plan stays serialisable


@pytest.mark.parametrize("name", ["photos.tar", "a{1..2}"])
def test_folders_named_like_tars_or_patterns_are_read_as_folders(tmp_path, name):
    root = _folder(tmp_path / name)
    assert [it["key"] for it in read_items(str(root))] == ["a", "b", "c"]


# -- symlinks ---------------------------------------------------------------------------------------------------
def test_symlinks_outside_the_input_are_refused_unless_allowed(tmp_path, caplog):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes(7))
    root = _folder(tmp_path / "in", names=("a",))
    (root / "link.jpg").symlink_to(secret)
    (root / "inner.jpg").symlink_to(root / "a.jpg")  # inside: fine
    with caplog.at_level(logging.WARNING):
        assert [it["key"] for it in read_items(str(root))] == ["a", "inner"]
    assert "links outside the input folder" in caplog.text
    assert [it["key"] for it in read_items(str(root), allow_outside_input=True)] == ["a", "inner", "link"]

"""Issue 11.2/11.3/11.9/11.10: whole-input faults are refused (InputError/ConfigError), bad items skipped with a reason."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnc.base.errors import LocationError
from cnc.base.location import check_writable_output
from cnc.config import ConfigError, load_config
from triplets.config import BuildConfig
from triplets.readers import InputError, detect_format, read_items, read_source_bytes


def _jpeg(seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _folder(root: Path, names=("a", "b", "c")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (root / f"{n}.jpg").write_bytes(_jpeg(i))
    return root


def _tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


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
        f.write(_jpeg(5))
    with caplog.at_level(logging.WARNING):
        items = read_items(str(root))
    assert [it["key"] for it in items] == ["a", "b", "c"]
    assert "not valid UTF-8" in caplog.text and "bad\\xff.jpg" in caplog.text
    json.dumps(items)  # the plan stays serialisable


# -- empty / mis-detected ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["empty", "photos.tar", "a{1..2}"])
def test_empty_folders_are_refused_whatever_their_name(tmp_path, name):
    root = tmp_path / name
    root.mkdir()
    assert detect_format(str(root)) == "folder"
    with pytest.raises(InputError, match="no usable images"):
        read_items(str(root))


@pytest.mark.parametrize("name", ["photos.tar", "a{1..2}"])
def test_folders_named_like_tars_or_patterns_are_read_as_folders(tmp_path, name):
    root = _folder(tmp_path / name)
    assert [it["key"] for it in read_items(str(root))] == ["a", "b", "c"]


@pytest.mark.parametrize("fmt,make", [
    ("coco", lambda p: _folder(p)),
    ("folder", lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_bytes(_tar_bytes([("a.jpg", _jpeg())])))),
    ("webdataset", lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_text("{}"))),
])
def test_forced_format_that_does_not_fit_the_input_is_refused(tmp_path, fmt, make):
    path = tmp_path / ("x.json" if fmt == "webdataset" else "x.tar" if fmt == "folder" else "dir")
    make(path)
    with pytest.raises(InputError, match=f"input_format={fmt} needs"):
        read_items(str(path), fmt)


# -- webdataset -------------------------------------------------------------------------------------------------
def test_gzip_tar_named_tar_is_refused(tmp_path):
    tar = tmp_path / "x.tar"
    tar.write_bytes(gzip.compress(_tar_bytes([("a.jpg", _jpeg()), ("a.txt", b"cap")])))
    with pytest.raises(InputError, match="gzip-compressed"):
        read_items(str(tar))


def test_non_tar_named_tar_is_refused(tmp_path):
    tar = tmp_path / "x.tar"
    tar.write_bytes(b"hello, not a tar" * 100)
    with pytest.raises(InputError, match="not a readable tar"):
        read_items(str(tar))


def test_brace_pattern_with_missing_files_is_refused(tmp_path):
    (tmp_path / "0.tar").write_bytes(_tar_bytes([("a.jpg", _jpeg())]))
    with pytest.raises(InputError, match="1 of the 2 tars .* missing"):
        read_items(str(tmp_path / "{0..1}.tar"))


def test_tar_truncated_mid_member_gives_a_per_item_reason(tmp_path, caplog):
    data = _tar_bytes([("a.jpg", _jpeg(0)), ("a.txt", b"one"), ("b.jpg", _jpeg(1)), ("b.txt", b"two"),
                       ("c.jpg", _jpeg(2))])
    with tarfile.open(fileobj=io.BytesIO(data)) as full:
        b = full.getmember("b.jpg")
    tar = tmp_path / "x.tar"
    tar.write_bytes(data[: b.offset_data + b.size // 2])  # cut inside b.jpg's data
    with caplog.at_level(logging.WARNING):
        items = read_items(str(tar))
    assert [it["caption"] for it in items] == ["one", ""]
    assert read_source_bytes(items[0]["source"]) == _jpeg(0)
    with pytest.raises(OSError, match="truncated"):
        read_source_bytes(items[1]["source"])
    tar.write_bytes(data[: b.offset_data - 100])  # cut inside b.jpg's header
    with caplog.at_level(logging.WARNING):
        assert [it["key"] for it in read_items(str(tar))] == ["x/a"]


def test_non_utf8_member_names_and_captions_are_skipped_per_item(tmp_path, caplog):
    tar = tmp_path / "x.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name, data in [("a.jpg", _jpeg()), ("a.txt", b"\xff\xfe"), ("\xe9t\xe9.jpg", _jpeg(1))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())
    with caplog.at_level(logging.WARNING):
        items = read_items(str(tar))
    assert [(it["key"], it["caption"]) for it in items] == [("x/a", "")]
    assert "not valid UTF-8" in caplog.text and "x.tar#a.txt: not UTF-8" in caplog.text


# -- COCO -------------------------------------------------------------------------------------------------------
def _coco(tmp_path: Path, data) -> Path:
    (tmp_path / "annotations").mkdir(parents=True, exist_ok=True)
    (tmp_path / "train2017").mkdir(exist_ok=True)
    for i in (1, 2, 3):
        (tmp_path / "train2017" / f"{i:012d}.jpg").write_bytes(_jpeg(i))
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
    (tmp_path / "outside.jpg").write_bytes(_jpeg(9))
    with caplog.at_level(logging.WARNING):
        items = read_items(str(_coco(tmp_path, data)))
    assert [(it["key"], it["caption"]) for it in items] == [("000000000001", "one"), ("000000000002", "")]
    assert "annotations[1]" in caplog.text and "images[2]" in caplog.text and "images[3]" in caplog.text
    assert "points outside" in caplog.text
    data["images"] = data["images"][-1:]
    items = read_items(str(_coco(tmp_path, data)), allow_outside_input=True)
    assert [it["key"] for it in items] == ["000000000005"]


# -- symlinks ---------------------------------------------------------------------------------------------------
def test_symlinks_outside_the_input_are_refused_unless_allowed(tmp_path, caplog):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg(7))
    root = _folder(tmp_path / "in", names=("a",))
    (root / "link.jpg").symlink_to(secret)
    (root / "inner.jpg").symlink_to(root / "a.jpg")  # inside: fine
    with caplog.at_level(logging.WARNING):
        assert [it["key"] for it in read_items(str(root))] == ["a", "inner"]
    assert "links outside the input folder" in caplog.text
    assert [it["key"] for it in read_items(str(root), allow_outside_input=True)] == ["a", "inner", "link"]


# -- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("device=banana", "unknown device 'banana'"), ("seed=99999999999999999999999", "seed"),
    ("seed=-1", "seed"), ("input_format=parquet", "input_format")])
def test_bad_build_values_are_refused_at_the_entry_point(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(BuildConfig, None, [override])


def test_good_devices_pass():
    for dev in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert load_config(BuildConfig, None, [f"device={dev}"]).device == dev


def test_train_seeds_are_range_checked():
    from cnc_model.training.config import TrainConfig

    with pytest.raises(ConfigError, match="seed"):
        load_config(TrainConfig, None, ["stage=local", "output_dir=x", f"seed={2**40}"])
    with pytest.raises(ConfigError, match="validation.seed"):
        load_config(TrainConfig, None, ["stage=local", "output_dir=x", "validation.seed=-5"])


@pytest.mark.parametrize("text", ["a: [1, 2\n", "key: value\n  bad indent: x\n", "\t- tab\n", b"seed: \xff\n"])
def test_malformed_yaml_is_a_config_error(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(BuildConfig, cfg)


def test_output_that_is_a_file_or_read_only_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LocationError, match="existing file"):
        check_writable_output(f)
    with pytest.raises(LocationError, match="existing file"):
        check_writable_output(f / "sub")
    assert check_writable_output(tmp_path / "new" / "deeper").local_path() == tmp_path / "new" / "deeper"
    with pytest.raises(LocationError, match="writ"):
        check_writable_output("/proc/1/new-output")

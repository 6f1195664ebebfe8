"""``webdataset`` inputs (:mod:`triplets.readers.webdataset`): img2dataset-style tars, brace patterns and folders of
tars; compressed, non-tar, truncated and non-UTF-8 inputs; object storage."""

from __future__ import annotations

import gzip
import io
import logging
import tarfile

import pytest

from tests.support import jpeg_bytes, tar_bytes
from triplets.readers import InputError, detect_format, read_items, read_source_bytes


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_input_img2dataset_style(tmp_path):
    img = jpeg_bytes(3)
    _tar(tmp_path / "00000.tar", [("000000000.jpg", img), ("000000000.txt", b"a cat"), ("000000000.json", b"{}"),
                                  ("000000001.jpg", jpeg_bytes(4)), ("000000001.txt", b"a dog"),
                                  ("000000002.txt", b"caption without image")])
    _tar(tmp_path / "00001.tar", [("000010000.png", jpeg_bytes(5)), ("000010000.txt", b"png one")])
    pattern = str(tmp_path / "{00000..00001}.tar")
    assert detect_format(pattern) == "webdataset"
    items = read_items(pattern)
    assert [it["caption"] for it in items] == ["a cat", "a dog", "png one"]
    assert read_source_bytes(items[0]["source"]) == img
    assert len({it["key"] for it in items}) == 3
    assert [it["key"] for it in read_items(str(tmp_path))] == [it["key"] for it in items]  # folder of tars


# -- webdataset -------------------------------------------------------------------------------------------------
def test_gzip_tar_named_tar_is_refused(tmp_path):
    tar = tmp_path / "x.tar"
    tar.write_bytes(gzip.compress(tar_bytes([("a.jpg", jpeg_bytes()), ("a.txt", b"cap")])))
    with pytest.raises(InputError, match="gzip-compressed"):
        read_items(str(tar))


def test_non_tar_named_tar_is_refused(tmp_path):
    tar = tmp_path / "x.tar"
    tar.write_bytes(b"hello, not a tar" * 100)
    with pytest.raises(InputError, match="not a readable tar"):
        read_items(str(tar))


def test_brace_pattern_with_missing_files_is_refused(tmp_path):
    (tmp_path / "0.tar").write_bytes(tar_bytes([("a.jpg", jpeg_bytes())]))
    with pytest.raises(InputError, match="1 of the 2 tars .* missing"):
        read_items(str(tmp_path / "{0..1}.tar"))


def test_tar_truncated_mid_member_gives_a_per_item_reason(tmp_path, caplog):
    data = tar_bytes([("a.jpg", jpeg_bytes(0)), ("a.txt", b"one"), ("b.jpg", jpeg_bytes(1)), ("b.txt", b"two"),
                       ("c.jpg", jpeg_bytes(2))])
    with tarfile.open(fileobj=io.BytesIO(data)) as full:
        b = full.getmember("b.jpg")
    tar = tmp_path / "x.tar"
    tar.write_bytes(data[: b.offset_data + b.size // 2])  # cut inside b.jpg's data
    with caplog.at_level(logging.WARNING):
        items = read_items(str(tar))
    assert [it["caption"] for it in items] == ["one", ""]
    assert read_source_bytes(items[0]["source"]) == jpeg_bytes(0)
    with pytest.raises(OSError, match="truncated"):
        read_source_bytes(items[1]["source"])
    tar.write_bytes(data[: b.offset_data - 100])  # cut inside b.jpg's header
    with caplog.at_level(logging.WARNING):
        assert [it["key"] for it in read_items(str(tar))] == ["x/a"]


def test_non_utf8_member_names_and_captions_are_skipped_per_item(tmp_path, caplog):
    tar = tmp_path / "x.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name, data in [("a.jpg", jpeg_bytes()), ("a.txt", b"\xff\xfe"), ("\xe9t\xe9.jpg", jpeg_bytes(1))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())
    with caplog.at_level(logging.WARNING):
        items = read_items(str(tar))
    assert [(it["key"], it["caption"]) for it in items] == [("x/a", "")]
    assert "not valid UTF-8" in caplog.text and "x.tar#a.txt: not UTF-8" in caplog.text


def test_tars_on_object_storage(memory_fs):
    fs, root = memory_fs
    fs.pipe(f"{root}/wds/00000.tar", tar_bytes([("x.jpg", jpeg_bytes(4)), ("x.txt", b"tar caption")]))
    [item] = read_items(f"memory://{root}/wds/{{00000..00000}}.tar")
    assert item["caption"] == "tar caption" and read_source_bytes(item["source"]) == jpeg_bytes(4)

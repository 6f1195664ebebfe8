"""The readers' entry points (:mod:`triplets.readers`): format registry, forced formats, duplicate keys, shard items
of either plan form, source bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnc.base.errors import LocationError
from tests.support import jpeg_bytes, tar_bytes
from triplets.config import BuildConfig
from triplets.readers import (
    FORMATS,
    READERS,
    InputError,
    ReadOptions,
    TableColumns,
    get_reader,
    plan_input,
    read_items,
    read_source_bytes,
    shard_items,
)


def _folder(root: Path, names=("a", "b", "c")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (root / f"{n}.jpg").write_bytes(jpeg_bytes(i))
    return root


def test_every_format_of_the_config_has_one_reader():
    assert tuple(READERS) == FORMATS
    assert FORMATS == BuildConfig.model_fields["input_format"].annotation.__args__[1:]  # "auto" + the formats
    assert all(get_reader(name).name == name for name in FORMATS)
    with pytest.raises(InputError, match="unknown input format 'parquet'"):
        get_reader("parquet")


def test_read_options_come_from_the_build_config():
    cfg = BuildConfig.model_validate({"allow_outside_input": True, "input_hash": True,
                                      "table": {"image_column": "img", "mask_column": "m"}})
    assert ReadOptions.from_config(cfg) == ReadOptions(True, True, TableColumns(image="img", mask="m"))


def test_shard_items_of_both_plan_forms(tmp_path):
    """An item-list spec is its items; a range spec is read by the reader of each range's file, in range order."""
    assert shard_items({"shard": 0, "items": [{"key": "x"}]}, ReadOptions()) == [{"key": "x"}]
    members = [(f"{k}.jpg", jpeg_bytes(i)) for i, k in enumerate("abcd")] + [("a.txt", b"cap a")]
    (tmp_path / "t.tar").write_bytes(tar_bytes(sorted(members)))
    tar = str(tmp_path / "t.tar")
    [planned] = plan_input(tar, "webdataset", ReadOptions()).files
    assert planned["rows"] == 4 and planned["url"] == tar
    spec = {"shard": 0, "ranges": [{"file": 0, "url": tar, "start": 1, "stop": 3},
                                   {"file": 0, "url": tar, "start": 0, "stop": 1}]}
    items = shard_items(spec, ReadOptions())
    assert [it["key"] for it in items] == ["t/b", "t/c", "t/a"] and items[2]["caption"] == "cap a"
    assert read_source_bytes(items[0]["source"]) == jpeg_bytes(1)
    with pytest.raises(OSError, match="repeats"):  # a key twice in one shard
        shard_items({"shard": 0, "ranges": spec["ranges"] * 2}, ReadOptions())
    with pytest.raises(OSError, match="planned, 2 found"):  # the tar changed under the plan
        shard_items({"shard": 0, "ranges": [{"file": 0, "url": tar, "start": 2, "stop": 5}]}, ReadOptions())
    with pytest.raises(OSError, match="no reader"):
        shard_items({"shard": 0, "ranges": [{"file": 0, "url": str(tmp_path / "x.zip"), "start": 0, "stop": 1}]},
                    ReadOptions())
    with pytest.raises(OSError, match="names no image"):
        read_source_bytes("")


def test_forced_format_duplicates_and_missing_input(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "a.png").write_bytes(jpeg_bytes())
    with pytest.raises(InputError, match="same sample key"):
        read_items(str(tmp_path), "folder")
    with pytest.raises(InputError, match="unknown input format"):
        read_items(str(tmp_path), "parquet")
    with pytest.raises(InputError, match="does not exist"):
        read_items(str(tmp_path / "nope"))


@pytest.mark.parametrize("fmt,make", [
    ("coco", lambda p: _folder(p)),
    ("folder", lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_bytes(tar_bytes([("a.jpg", jpeg_bytes())])))),
    ("webdataset", lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_text("{}"))),
])
def test_forced_format_that_does_not_fit_the_input_is_refused(tmp_path, fmt, make):
    path = tmp_path / ("x.json" if fmt == "webdataset" else "x.tar" if fmt == "folder" else "dir")
    make(path)
    with pytest.raises(InputError, match=f"input_format={fmt} needs"):
        read_items(str(path), fmt)


def test_unknown_scheme_is_a_location_error():
    with pytest.raises(LocationError, match="unknown URL scheme"):
        read_items("nosuchscheme://bucket/photos")

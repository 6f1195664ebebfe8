"""Paths and URLs (:mod:`cnc.base.location`): output checks, atomic writes, refusals."""

from __future__ import annotations

import pytest

from cnc.base.errors import LocationError
from cnc.base.location import check_writable_output


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


def test_unknown_or_malformed_urls_are_refused_and_local_paths_resolve(tmp_path):
    from cnc.base.location import is_url, looks_like_url, resolve

    with pytest.raises(LocationError, match="unknown URL scheme"):
        resolve("nosuchscheme://bucket/x")
    assert looks_like_url("s3:/bucket/x") and not is_url("s3:/bucket/x") and is_url("s3://bucket/x")
    loc = resolve(tmp_path / "a" / "b.json")
    assert loc.is_local and loc.name == "b.json" and loc.parent.local_path() == tmp_path / "a"
    assert loc.child("x").url.endswith("/a/b.json/x")


def test_atomic_writes_leave_no_temporaries_and_temp_names_are_recognised(tmp_path):
    from cnc.base.location import TEMP_NAME, resolve, temp_name

    loc = resolve(tmp_path / "out" / "data.json")
    loc.write_json({"b": 1, "a": [1, 2]})
    assert loc.read_json() == {"a": [1, 2], "b": 1}
    assert loc.read_text().index('"a"') < loc.read_text().index('"b"')  # sorted keys
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.json"]
    name = temp_name("000001.tar")
    assert TEMP_NAME.match(name).group("final") == "000001.tar" and not name.endswith(".tar")
    assert loc.create_exclusive(b"x") is False  # something is there already
    assert resolve(tmp_path / "out" / "new").create_exclusive(b"x") is True

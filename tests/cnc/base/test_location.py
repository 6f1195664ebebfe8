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

"""Format detection (:mod:`triplets.readers.detect`): what exists is checked first."""

from __future__ import annotations

import pytest

from triplets.readers import InputError, detect_format, read_items


# -- empty / mis-detected ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["empty", "photos.tar", "a{1..2}"])
def test_empty_folders_are_refused_whatever_their_name(tmp_path, name):
    root = tmp_path / name
    root.mkdir()
    assert detect_format(str(root)) == "folder"
    with pytest.raises(InputError, match="no usable images"):
        read_items(str(root))

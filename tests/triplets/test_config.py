"""The build config (:mod:`triplets.config`): bad values refused at the entry point."""

from __future__ import annotations

import pytest

from cnc.config import ConfigError, load_config
from triplets.config import BuildConfig


@pytest.mark.parametrize("override,match", [
    ("device=banana", "unknown device 'banana'"), ("seed=99999999999999999999999", "seed"),
    ("seed=-1", "seed"), ("input_format=parquet", "input_format")])
def test_bad_build_values_are_refused_at_the_entry_point(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(BuildConfig, None, [override])


def test_good_devices_pass():
    for dev in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert load_config(BuildConfig, None, [f"device={dev}"]).device == dev

"""Typed YAML configs (:mod:`cnc.config`): malformed files are one config error naming the file."""

from __future__ import annotations

import pytest

from cnc.config import ConfigError, load_config
from triplets.config import BuildConfig


@pytest.mark.parametrize("text", ["a: [1, 2\n", "key: value\n  bad indent: x\n", "\t- tab\n", b"seed: \xff\n"])
def test_malformed_yaml_is_a_config_error(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(BuildConfig, cfg)

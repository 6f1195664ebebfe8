"""The training config (:mod:`cnc_model.training.config`): seeds are range-checked."""

from __future__ import annotations

import pytest

from cnc.config import ConfigError, load_config


def test_train_seeds_are_range_checked():
    from cnc_model.training.config import TrainConfig

    with pytest.raises(ConfigError, match="seed"):
        load_config(TrainConfig, None, ["stage=local", "output_dir=x", f"seed={2**40}"])
    with pytest.raises(ConfigError, match="validation.seed"):
        load_config(TrainConfig, None, ["stage=local", "output_dir=x", "validation.seed=-5"])

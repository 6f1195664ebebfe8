"""``cnc_model.sources``: the up-front check of a run's base model and the ``--dtype`` names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cnc.base.errors import UserError
from cnc_model.sources import base_model_problems, pipeline_dtype


def _source(kind: str, base: str):
    model = SimpleNamespace(pretrained_model_name_or_path=base)
    return SimpleNamespace(kind=kind, config=SimpleNamespace(model=model, seed=0))


def test_a_missing_base_model_is_one_line_naming_it_and_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-sd"
    for kind in ("run", "checkpoint"):
        (line,) = base_model_problems(_source(kind, str(missing)))
        assert str(missing) in line and "model.pretrained_model_name_or_path" in line
    assert base_model_problems(_source("run", "tiny")) == []  # the seeded tiny base is always there
    assert base_model_problems(_source("pipeline", str(missing))) == []  # a pipeline folder holds its base parts


def test_dtype_names():
    assert pipeline_dtype("bfloat16") is torch.bfloat16 and pipeline_dtype("float32") is torch.float32
    with pytest.raises(UserError, match="--dtype takes float32, float16, bfloat16, got 'fp8'"):
        pipeline_dtype("fp8")

"""A fuser started from another run must have been trained against the frozen UNet this run loads (issue 30: no step
silently pairs fusers with another UNet; the reference's ``integrate`` asserts the same frozen weights)."""

from __future__ import annotations

import logging

import pytest
import yaml

from cnc_model.training.provenance import BASE_KEY, ModelChangedError, check_fuser_base


def _run(tmp_path, name: str, models: dict):
    run = tmp_path / name
    (run / "local_fuser").mkdir(parents=True)
    (run / "local_fuser" / "config.json").write_text("{}")
    (run / "train_config.yaml").write_text(yaml.safe_dump({"stage": "local", "provenance": {"models": models}}))
    return run / "local_fuser"


def test_a_fuser_trained_on_another_frozen_unet_is_refused(tmp_path, caplog):
    base_a = {BASE_KEY: {"id": "sd", "identity": "sha256:aaa"}}
    fuser = _run(tmp_path, "local", base_a)
    check_fuser_base(fuser, "model.local_fuser", dict(base_a))  # the same base: fine
    with pytest.raises(ModelChangedError, match=r"model\.local_fuser .* sha256:aaa, this run loads sha256:bbb"):
        check_fuser_base(fuser, "model.local_fuser", {BASE_KEY: {"id": "sd", "identity": "sha256:bbb"}})
    own_unet = {**base_a, "model.unet": {"id": "ckpt/unet", "identity": "sha256:ccc"}}
    with caplog.at_level(logging.WARNING):  # another kind of record: said, not refused (the weights may be equal)
        check_fuser_base(fuser, "model.local_fuser", own_unet)
    assert "make sure they are the same weights" in caplog.text
    unet_run = _run(tmp_path, "unet-run", own_unet)
    with pytest.raises(ModelChangedError, match=r"model\.unet identity sha256:ccc"):
        check_fuser_base(unet_run, "model.local_fuser", {**base_a, "model.unet": {"identity": "sha256:ddd"}})
    check_fuser_base(tmp_path / "nowhere", "model.local_fuser", base_a)  # no record: nothing to compare

"""What ``cnc push`` refuses before any network call (one line each)."""

from __future__ import annotations

import pytest

from cnc.publish import PushError, folder_kind, push


def test_folder_kind(tmp_path):
    build = tmp_path / "build"
    (build / "_cnc").mkdir(parents=True)
    (build / "000000.tar").write_bytes(b"")
    (build / "_cnc" / "manifest.json").write_text("{}")
    assert folder_kind(build) == "dataset"
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    assert folder_kind(pipe) == "model"
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.yaml").write_text("stage: local\n")
    with pytest.raises(PushError, match="export it first"):
        folder_kind(run)
    with pytest.raises(PushError, match="neither a build folder"):
        folder_kind(tmp_path)


def test_offline_and_misused_options_fail_before_the_hub(tmp_path, monkeypatch):
    build = tmp_path / "build"
    (build / "_cnc").mkdir(parents=True)
    (build / "000000.tar").write_bytes(b"")
    (build / "_cnc" / "manifest.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push(build, "me/x")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(PushError, match="--dataset names the training data of a model"):
        push(build, "me/x", datasets=["me/y"])
    with pytest.raises(PushError, match="is not a folder"):
        push(tmp_path / "nope", "me/x")

"""Issue 11.1: checkpoint rotation after completion, fallback from a damaged newest checkpoint, loud RNG loss."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cnc_model.training import Trainer, load_train_config
from cnc_model.training import checkpointing as ckpt
from tests.support import REPO


def _fake(out: Path, step: int, complete: bool = True) -> Path:
    p = out / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "optimizer.bin").write_bytes(b"x")
    if complete:
        (p / ckpt.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    return p


def test_rotation_keeps_the_newest_complete_and_never_counts_incomplete(tmp_path):
    _fake(tmp_path, 2)
    _fake(tmp_path, 4)
    _fake(tmp_path, 5, complete=False)   # stale leftover of a failed save (older than the newest complete)
    _fake(tmp_path, 6)
    _fake(tmp_path, 9, complete=False)   # newer than any complete one (maybe being written): left alone
    ckpt.rotate_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-9"]
    assert ckpt.is_complete(tmp_path / "checkpoint-6")


def test_limit_1_and_a_stale_incomplete_folder_keep_the_complete_checkpoint(tmp_path):
    _fake(tmp_path, 2)
    _fake(tmp_path, 1, complete=False)
    ckpt.rotate_checkpoints(tmp_path, 1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2"]


def _config(shards, out, *extra):
    return load_train_config(REPO / "configs/train/tiny.yaml", [
        "model.pretrained_model_name_or_path=tiny", f"data.train_shards={shards}", f"output_dir={out}",
        "data.resolution=64", "data.num_workers=0", "data.shuffle_buffer=8", "train.mixed_precision=no",
        "train.gradient_checkpointing=false", "train.report_to=none", "train.progress_bar=false",
        "train.train_batch_size=2", "validation.num_samples=0", "train.max_train_steps=4",
        "train.checkpointing_steps=2", *extra])


def test_failed_save_leaves_the_previous_checkpoint(tiny_shards, tmp_path, monkeypatch):
    """limit=1: the save of checkpoint-4 dies half-way (disk full) -> checkpoint-2 is still there, complete; no
    checkpoint-4 folder at all (the save was staged); one line says what, where and why (issue 26.3)."""
    from accelerate import Accelerator

    real = Accelerator.save_state

    def save_state(self, output_dir=None, **kw):
        if "checkpoint-4" in output_dir:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(output_dir) / "optimizer.bin", "wb") as f:
                f.write(b"partial")
                raise OSError(28, "No space left on device")  # write() on an open file: no path in the error
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        Trainer(_config(tiny_shards, tmp_path, "train.checkpoints_total_limit=1")).train()
    assert str(err.value) == (f"could not write checkpoint-4: disk full at {tmp_path / 'checkpoint-4.partial'} "
                              "(ENOSPC: No space left on device); checkpoint-2 is intact (--resume latest)")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]  # nothing partial left
    assert ckpt.checkpoint_problems(tmp_path / "checkpoint-2") == []


def test_resave_into_an_existing_folder_marks_it_incomplete_first(tmp_path):
    p = _fake(tmp_path, 3)
    ckpt.mark_incomplete(p)
    assert not ckpt.is_complete(p) and ckpt.list_checkpoints(tmp_path) == []


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory) -> Path:
    """A 4-step run with complete checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("ckpt-run") / "run"
    Trainer(_config(tiny_shards, out, "train.checkpoints_total_limit=3")).train()
    return out


@pytest.mark.parametrize("damage", ["optimizer.bin", "local_fuser/diffusion_pytorch_model.safetensors",
                                    "data_state_rank_0.json"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous(tiny_shards, trained_run, tmp_path, caplog, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    target = out / "checkpoint-4" / damage
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    assert ckpt.checkpoint_problems(out / "checkpoint-4")
    with caplog.at_level(logging.INFO, logger="cnc_model"):
        trainer = Trainer(_config(tiny_shards, out, "train.resume_from_checkpoint=latest",
                                  "train.max_train_steps=2"))
        trainer.setup()
    assert trainer.global_step == 2
    assert "checkpoint-4 is damaged" in caplog.text and "falling back" in caplog.text
    assert "resumed from" in caplog.text and "checkpoint-2" in caplog.text


def test_unreadable_rng_state_is_reported_loudly(tiny_shards, tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(_config(tiny_shards, out, "train.max_train_steps=2")).train()
    (out / "checkpoint-2" / "random_states_0.pkl").write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="cnc_model"):
        trainer = Trainer(_config(tiny_shards, out, "train.resume_from_checkpoint=latest",
                                  "train.max_train_steps=2"))
        trainer.setup()
    assert trainer.global_step == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("RNG state NOT restored" in r.getMessage() for r in errors)

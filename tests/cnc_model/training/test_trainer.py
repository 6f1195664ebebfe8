"""The accelerate training loop (cnc_model.training) on tiny models and real shards from a tiny build."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnc.base.location import resolve
from cnc.tiny import tiny_unet
from cnc_model.training import Trainer, load_train_config
from tests.support import REPO, tiny_overrides, train_cli_app
from triplets.shardio import iter_samples, write_shard


def _clone(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_stage_configs_run_two_steps_each(tiny_shards, tmp_path):
    """local, global, then joint initialised from both: frozen weights bit-identical, trainables changed."""
    outs: dict[str, Path] = {}
    for stage in ("local", "global", "joint"):
        extra = ["train.max_train_steps=2", "validation.num_samples=2", "validation.num_inference_steps=2"]
        if stage == "joint":
            extra += [f"model.local_fuser={outs['local']}", f"model.global_fuser={outs['global'] / 'global_fuser'}"]
        out = tmp_path / stage
        trainer = Trainer(load_train_config(REPO / f"configs/train/{stage}.yaml", tiny_overrides(tiny_shards, out,
                                                                                                 *extra)))
        trainer.setup()
        comps = trainer.components
        frozen = {n: _clone(getattr(comps, n)) for n in ("unet", "vae", "text_encoder")}
        before = {n: _clone(m) for n, m in comps.trainables().items()}
        assert list(before) == {"local": ["local_fuser"], "global": ["global_fuser"],
                                "joint": ["local_fuser", "global_fuser"]}[stage]
        if stage == "joint":  # initialised from the two earlier runs
            for name in before:
                saved = load_file(outs["local" if name == "local_fuser" else "global"] / name /
                                  "diffusion_pytorch_model.safetensors")
                assert all(torch.equal(before[name][k], saved[k]) for k in saved)

        result = trainer.train()

        assert result.global_step == 2 and len(result.losses) == 2
        assert all(torch.isfinite(torch.tensor(result.losses)))
        for name, state in frozen.items():
            after = getattr(comps, name).state_dict()
            assert all(torch.equal(state[k], after[k]) for k in state), f"{name} changed"
        for name, state in before.items():
            after = comps.trainables()[name].state_dict()
            assert any(not torch.equal(state[k], after[k]) for k in state), f"{name} did not change"
        if "local_fuser" in before:  # the zero convs left zero: depth conditioning is being learned
            assert comps.local_fuser.controlnet_mid_block.weight.abs().sum() > 0
        assert (out / "train_config.yaml").is_file() and (out / "checkpoint-2" / "trainer_state.json").is_file()
        for name in before:
            assert (out / name / "diffusion_pytorch_model.safetensors").is_file()
        from PIL import Image

        from cnc_model.training.validation import COLUMNS
        from triplets.inspect.grid import grid_geometry

        grid = Image.open(result.validation_images[-1])  # 2 titled rows x (image, fg/bg depth, mask, I_b, output)
        assert grid.size == grid_geometry(COLUMNS, 2, 64, footer="settings").size
        outs[stage] = out


class FixedNoiseTrainer(Trainer):
    """Same noise and timesteps every step: the loss measures fitting, not sampling noise."""

    def sample_noise(self, latents):
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        return noise, torch.tensor([100, 400, 700, 900])[: latents.shape[0]]


def test_overfitting_four_samples_lowers_the_loss(tiny_shards, tmp_path):
    """Measured (local stage, 4 samples, 100 steps, lr 1e-3, fixed noise/t): mean of the first 10 losses ~1.17,
    of the last 10 ~0.2 (an 80-85% drop); the bound asserted is a 40% drop."""
    samples = list(iter_samples(str(tiny_shards / "{000000..000001}.tar")))[:4]
    (tmp_path / "data").mkdir()
    stats = write_shard(tmp_path / "data" / "000000.tar", samples)
    resolve(tmp_path / "data" / "000000_stats.json").write_json(stats)
    cfg = load_train_config(REPO / "configs/train/local.yaml", tiny_overrides(
        tmp_path / "data", tmp_path / "out", "train.train_batch_size=4", "train.max_train_steps=100",
        "train.checkpointing_steps=1000", "optim.learning_rate=1e-3", "data.shuffle_buffer=0",
        "data.drop_caption_prob=0", "data.drop_depth_prob=0", "data.preflight_shards=0"))
    losses = FixedNoiseTrainer(cfg).train().losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_resume_after_ctrl_c_equals_a_straight_run(tiny_shards, tmp_path):
    """10 steps straight == 5 steps, Ctrl-C (checkpoint), --resume latest, 5 steps: same losses and weights."""
    def config(out, *extra):
        return load_train_config(REPO / "configs/train/joint.yaml", tiny_overrides(
            tiny_shards, out, "model.local_fuser=null", "model.global_fuser=null", "train.max_train_steps=10",
            "train.checkpointing_steps=100", "train.use_ema=true", "train.ema_decay=0.9", *extra))

    straight = Trainer(config(tmp_path / "a")).train()

    def ctrl_c_at_5(trainer, step):
        if step == 5:
            signal.raise_signal(signal.SIGINT)

    first = Trainer(config(tmp_path / "b"), step_callback=ctrl_c_at_5).train()
    assert first.interrupted and first.global_step == 5 and first.signal == signal.SIGINT  # cnc train exits 130
    ckpt5 = tmp_path / "b" / "checkpoint-5"
    assert (ckpt5 / "trainer_state.json").is_file()
    # EMA state is stored as safetensors (loadable without unpickling), never as accelerate's custom pickle
    assert (ckpt5 / "ema_local_fuser" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(ckpt5.glob("custom_checkpoint_*"))
    second = Trainer(config(tmp_path / "b", "train.resume_from_checkpoint=latest")).train()
    assert second.global_step == 10 and not second.interrupted

    assert torch.allclose(torch.tensor(first.losses + second.losses), torch.tensor(straight.losses), rtol=1e-5)
    for name in ("local_fuser", "global_fuser"):  # final (EMA) weights
        a = load_file(tmp_path / "a" / name / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "b" / name / "diffusion_pytorch_model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_checkpoint_rotation_and_resume_latest_from_the_cli(tiny_shards, tmp_path, caplog):
    from typer.testing import CliRunner

    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs/train/tiny.yaml")]
    for item in tiny_overrides(tiny_shards, out, "train.max_train_steps=6", "train.checkpointing_steps=2",
                               "train.checkpoints_total_limit=2"):
        args += ["--set", item]
    result = CliRunner().invoke(train_cli_app(), args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    ckpt = out / "checkpoint-6"
    names = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert {"local_fuser/config.json", "local_fuser/diffusion_pytorch_model.safetensors", "optimizer.bin",
            "scheduler.bin", "random_states_0.pkl", "data_state_rank_0.json", "trainer_state.json"} <= names
    assert not any("unet" in n or "vae" in n or n.startswith("model") for n in names)  # never the frozen parts
    fuser_bytes = (ckpt / "local_fuser/diffusion_pytorch_model.safetensors").stat().st_size
    unet_bytes = sum(p.numel() * 4 for p in tiny_unet().parameters())
    assert sum((ckpt / n).stat().st_size for n in names) < 4 * fuser_bytes + unet_bytes / 2

    with caplog.at_level(logging.INFO, logger="cnc_model.training.trainer"):
        result = CliRunner().invoke(train_cli_app(), args + ["--set", "train.max_train_steps=8", "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in caplog.text and "at step 6" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8


def test_cli_fails_fast_on_a_missing_base_model(tiny_shards, tmp_path):
    from typer.testing import CliRunner

    args = ["train", "--config", str(REPO / "configs/train/local.yaml"), "--set", f"data.train_shards={tiny_shards}",
            "--set", f"output_dir={tmp_path}", "--set", "model.pretrained_model_name_or_path=/nonexistent/sd15"]
    result = CliRunner().invoke(train_cli_app(), args)
    assert result.exit_code == 2
    assert "/nonexistent/sd15" in result.output and "model.pretrained_model_name_or_path" in result.output
    bad = CliRunner().invoke(train_cli_app(), ["train", "--config", str(REPO / "configs/train/local.yaml"),
                                      "--set", "train.learning_rate=1"])
    assert bad.exit_code == 2 and "learning_rate" in bad.output


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = load_train_config(REPO / "configs/train/tiny.yaml",
                            tiny_overrides(tiny_shards, tmp_path, "optim.use_8bit_adam=true"))
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        Trainer(cfg)._make_optimizer([torch.nn.Parameter(torch.zeros(1))])


def test_truncated_shard_does_not_stop_training(tiny_shards, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_shards / "000001.tar", data / "000001.tar")
    whole = (tiny_shards / "000000.tar").read_bytes()
    (data / "000000.tar").write_bytes(whole[: len(whole) // 2 + 7])
    cfg = load_train_config(REPO / "configs/train/tiny.yaml", tiny_overrides(
        data / "*.tar", tmp_path / "out", "train.max_train_steps=6", "train.train_batch_size=1",
        "data.epoch_samples=6", "data.shuffle_buffer=0"))
    with caplog.at_level(logging.WARNING):
        result = Trainer(cfg).train()
    assert result.global_step == 6 and result.skipped.get("shard", 0) >= 1
    assert "truncated" in caplog.text and "corrupt shard" in caplog.text


def test_two_processes_on_cpu_train_on_disjoint_data(tiny_shards, tmp_path):
    """torchrun with 2 gloo processes (the accelerate launch / multi-node code path) on CPU."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cnc_model.training", "--config", str(REPO / "configs/train/tiny.yaml")]
    for item in tiny_overrides(tiny_shards, out, "train.max_train_steps=3", "train.train_batch_size=1",
                               "train.checkpointing_steps=2", "train.record_keys=true", "data.epoch_samples=6"):
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    keys = [set((out / "keys" / f"rank-{r}.txt").read_text().split()) for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    for ckpt in ("checkpoint-2", "checkpoint-3"):
        assert (out / ckpt / "data_state_rank_0.json").is_file() and (out / ckpt / "data_state_rank_1.json").is_file()
        assert json.loads((out / ckpt / "trainer_state.json").read_text())["num_processes"] == 2

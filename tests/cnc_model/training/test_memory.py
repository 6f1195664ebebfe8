"""Gradient checkpointing decided by a measurement (``cnc_model.training.memory``), fused AdamW, latents by default."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cnc_model.training.memory import checkpointing_decision, decide_checkpointing, optimizer_state_bytes

GIB = 2 ** 30


def test_optimizer_state_is_two_moments_per_trainable_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 3))
    model[1].requires_grad_(False)
    n = 10 * 20 + 20
    assert optimizer_state_bytes(model.parameters()) == 2 * 4 * n
    assert optimizer_state_bytes(model.parameters(), "adamw8bit") == 2 * n
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    moments = sum(s[k].numel() * s[k].element_size() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert moments == optimizer_state_bytes(model.parameters())  # what the first step really allocates


@pytest.mark.parametrize("peak,state,total,enabled", [
    (30 * GIB, 4 * GIB, 80 * GIB, False),  # fits in 90 % of an 80 GB card
    (70 * GIB, 4 * GIB, 80 * GIB, True),  # 74 GB > 72 GB
    (68 * GIB, 4 * GIB, 80 * GIB, False),  # exactly the budget
    (None, 4 * GIB, 80 * GIB, True),  # the probe ran out of memory
])
def test_decision_rule(peak, state, total, enabled):
    d = decide_checkpointing(peak, state, total)
    assert d.enabled is enabled and d.budget_bytes == int(0.9 * total)
    assert ("out of device memory" in d.reason) == (peak is None)


def test_no_device_memory_to_measure_on_the_cpu():
    calls = []
    d = checkpointing_decision(torch.device("cpu"), lambda: calls.append(1), [])
    assert not d.enabled and "cpu" in d.reason and not calls


def test_auto_checkpointing_and_optimizer_in_the_trainer(tiny_shards, tmp_path):
    """The shipped defaults reach the trainer: gradient_checkpointing auto (off on a CPU, with the reason), AdamW
    foreach on a CPU (fused on CUDA) unless optim.fused says otherwise."""
    from cnc_model.training import Trainer, load_train_config
    from tests.cnc_model.training.test_trainer import tiny_overrides
    from tests.support import REPO

    overrides = [o for o in tiny_overrides(tiny_shards, tmp_path / "out") if "gradient_checkpointing" not in o]
    cfg = load_train_config(REPO / "configs/train/local.yaml", overrides + ["train.max_train_steps=1"])
    assert cfg.train.gradient_checkpointing == "auto" and cfg.optim.fused is None and cfg.data.use_latents is None
    trainer = Trainer(cfg)
    trainer.setup()
    assert not trainer.checkpointing.enabled and "cpu" in trainer.checkpointing.reason
    assert not trainer.components.unet.is_gradient_checkpointing
    assert not trainer.optimizer.optimizer.defaults.get("fused")
    fake = SimpleNamespace(cfg=cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"fused": True})}),
                           accelerator=SimpleNamespace(device=torch.device("cpu"), num_processes=1))
    assert Trainer._make_optimizer(fake, [torch.nn.Parameter(torch.zeros(3))]).defaults["fused"]


def test_fused_adamw_gives_the_foreach_update():
    torch.manual_seed(0)
    params = [torch.randn(64, 33), torch.randn(33)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    out = {}
    for fused in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=fused, foreach=None if fused else True)
        for g in grads:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
        out[fused] = ps
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_latents_auto_uses_stored_moments_when_the_batch_has_them():
    from cnc.tiny import tiny_vae
    from cnc_model.data import TrainingDataError, sample_latents
    from cnc_model.training.trainer import Trainer

    vae = tiny_vae()

    def fake(mode):
        return SimpleNamespace(components=SimpleNamespace(vae=vae), accelerator=SimpleNamespace(device="cpu"),
                               weight_dtype=torch.float32, cfg=SimpleNamespace(data=SimpleNamespace(use_latents=mode)))

    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    moments, wrong = torch.randn(2, 2, 4, 8, 8), torch.randn(2, 2, 4, 4, 4)

    def draw(mode, batch):
        torch.manual_seed(3)
        with torch.no_grad():
            return Trainer.image_latents(fake(mode), batch)

    torch.manual_seed(3)
    stored = sample_latents(moments)
    torch.manual_seed(3)
    with torch.no_grad():
        encoded = vae.encode(pixels).latent_dist.sample()
    assert torch.equal(draw(None, {"pixel_values": pixels, "latent_dist": moments}), stored)
    assert torch.equal(draw(None, {"pixel_values": pixels}), encoded)  # shards without latent.npy
    assert torch.equal(draw(None, {"pixel_values": pixels, "latent_dist": wrong}), encoded)  # other resolution
    assert torch.equal(draw(False, {"pixel_values": pixels, "latent_dist": moments}), encoded)
    with pytest.raises(TrainingDataError, match="latents.resolution"):
        draw(True, {"pixel_values": pixels, "latent_dist": wrong})

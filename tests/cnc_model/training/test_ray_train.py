"""``cnc_model.training.ray_train``: the trainer's own loop on Ray Train workers (cluster tier: ``make test-cluster``).
Its node-loss journey is ``tests/journeys/test_node_loss.py``."""

from __future__ import annotations

import pytest

from cnc_model.training import load_train_config
from tests.support import REPO, tiny_overrides


@pytest.mark.ray
@pytest.mark.cluster
def test_ray_train_runs_the_same_loop_on_two_cpu_workers(tiny_shards, tmp_path, ray_local):
    from cnc_model.training.ray_train import run_ray_training  # lazy: ray is imported by the fixture first

    out = tmp_path / "ray"
    cfg = load_train_config(REPO / "configs/train/tiny.yaml", tiny_overrides(
        tiny_shards, out, "train.max_train_steps=2", "train.train_batch_size=1", "train.record_keys=true"))
    run_ray_training(cfg, num_workers=2, use_gpu=False, cpus_per_worker=1)
    keys = [set((out / "keys" / f"rank-{r}.txt").read_text().split()) for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert {p.name for p in (out / "checkpoint-2").glob("data_state_rank_*.json")} == {
        "data_state_rank_0.json", "data_state_rank_1.json"}
    assert (out / "local_fuser" / "diffusion_pytorch_model.safetensors").is_file()

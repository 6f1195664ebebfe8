"""Training of the CnC fusers (``cnc train``): typed config, streaming data, accelerate loop, Ray Train launcher.

Python entry points::

    from cnc_model.training import load_train_config, train
    cfg = load_train_config("configs/train/local.yaml", ["data.train_shards=out/build", "output_dir=out/local"])
    result = train(cfg)                       # single process, or one rank under accelerate launch / torchrun

    from cnc_model.training.ray_train import run_ray_training
    run_ray_training(cfg, num_workers=8, use_gpu=True)   # one Ray Train worker per GPU

Imports are lazy so ``import cnc_model.training`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "cnc_model.training.config",
    "load_train_config": "cnc_model.training.config",
    "Trainer": "cnc_model.training.trainer",
    "TrainResult": "cnc_model.training.trainer",
    "train": "cnc_model.training.trainer",
    "Components": "cnc_model.training.components",
    "load_components": "cnc_model.training.components",
    "find_latest_checkpoint": "cnc_model.training.checkpointing",
    "run_ray_training": "cnc_model.training.ray_train",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - computed from the lazy-export table


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cnc_model.training' has no attribute {name!r}")

"""Run :func:`cnc_model.training.train` under Ray Train: one ``TorchTrainer`` worker per GPU.

Ray Train starts the workers, sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` and initialises the
torch process group (NCCL on GPUs, gloo on CPUs); inside each worker the accelerate loop picks that up exactly as it
does under ``torchrun``. Checkpoints, logs and images go to ``cfg.output_dir`` as in every other launch mode (it must
be on storage every node can reach for multi-node runs, as for torchrun).

Node loss: ``FailureConfig(max_failures=...)`` lets Ray Train restart the worker group (on the nodes that are left)
when a worker or its node dies. The restarted workers resume from the newest complete checkpoint this run wrote
(:func:`restart_resume`), so at most the steps since the last checkpoint are computed again; from that checkpoint on
the run is the one an uninterrupted run would have been (the same data position and RNG streams are restored).

Usage::

    cnc train --config configs/train/global.yaml --set ... --workers 8 [--address auto]

    from cnc_model.training.ray_train import run_ray_training
    run_ray_training(cfg, num_workers=8, use_gpu=True, address="auto")
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from cnc.base.location import resolve
from cnc.config import config_dict
from cnc.logs import setup_logging
from cnc.ray_session import ray_session
from cnc_model.training.checkpointing import list_checkpoints
from cnc_model.training.config import TrainConfig
from cnc_model.training.run_storage import RunStorage

logger = logging.getLogger(__name__)


def existing_checkpoints(cfg: TrainConfig) -> list[str]:
    """Names of the complete checkpoints in ``cfg.output_dir`` now (on the store for a remote output)."""

    storage = RunStorage(cfg.output_dir)
    if storage.remote:
        return storage.remote_checkpoints()
    return [p.name for p in list_checkpoints(storage.local)]


def restart_resume(cfg: TrainConfig, before: list[str]) -> TrainConfig:
    """``cfg`` resuming from ``latest`` when this run has written a checkpoint since it started (``before``: the
    checkpoints that existed then), i.e. when Ray Train restarted the workers after a failure; else ``cfg``."""
    if cfg.train.resume_from_checkpoint:
        return cfg  # an explicit --resume: a restart resumes "latest" too (the newest complete one)
    if not set(existing_checkpoints(cfg)) - set(before):
        return cfg
    logger.warning("Ray Train restarted the workers: resuming from the last checkpoint of this run")
    data = cfg.model_dump(mode="json")
    data["train"]["resume_from_checkpoint"] = "latest"
    return TrainConfig.model_validate(data)


def _train_loop_per_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker: rebuild the config (resuming after a restart), train, report the final step."""

    from ray import train as ray_train

    from cnc_model.training.trainer import FAULT_ENV, train  # lazy: torch, on the Ray worker

    level = loop_config.get("log_level", "INFO")
    if logging.getLogger().handlers:  # Ray's worker logging already forwards to the driver
        logging.getLogger().setLevel(level)
    else:
        setup_logging(level)
    if loop_config.get("fault_injection"):
        os.environ[FAULT_ENV] = loop_config["fault_injection"]
    cfg = restart_resume(TrainConfig.model_validate(loop_config["config"]), loop_config.get("checkpoints_before", []))
    result = train(cfg)
    ray_train.report({"global_step": result.global_step, "interrupted": result.interrupted,
                      "last_loss": result.losses[-1] if result.losses else float("nan")})


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Workers may run in another directory: make local paths of ``cfg`` absolute."""

    def fix(value: str) -> str:
        if "://" in value or value.startswith("pipe:"):
            return value
        p = Path(value).expanduser()  # globs and brace patterns stay patterns, just anchored to this directory
        return str(p if p.is_absolute() else Path.cwd() / p)

    data = config_dict(cfg)
    data["output_dir"] = fix(cfg.output_dir)
    data["data"]["train_shards"] = [fix(u) for u in cfg.data.train_shards]
    data["validation"]["shards"] = [fix(u) for u in cfg.validation.shards]
    for key in ("pretrained_model_name_or_path", "local_fuser", "global_fuser"):
        value = data["model"][key]
        if value and Path(value).expanduser().exists():
            data["model"][key] = str(Path(value).expanduser().resolve())
    return TrainConfig.model_validate(data)


def run_ray_training(cfg: TrainConfig, num_workers: int, use_gpu: bool, address: str | None = None,
                     cpus_per_worker: float | None = None, log_level: str = "INFO", max_failures: int = 3):
    """Train ``cfg`` on ``num_workers`` Ray Train workers (one per GPU when ``use_gpu``).

    Args:
        cfg: the training config (sent to the workers as JSON).
        num_workers: data-parallel workers (processes).
        use_gpu: one GPU per worker; ``False`` trains on CPUs with gloo.
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``); ``None`` joins the cluster this process
            is already connected to or starts a local one.
        cpus_per_worker: CPUs reserved per worker (default: ``data.num_workers + 1``).
        max_failures: worker-group restarts after a worker or node failure (Ray Train ``FailureConfig``); each
            restart resumes from the newest checkpoint of this run.

    Returns:
        the ``ray.train.Result``; every worker reports ``global_step``, ``interrupted`` and ``last_loss``.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cnc_model.training.trainer import FAULT_ENV  # lazy: torch

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    cfg = _absolute_paths(cfg)
    cpus = cpus_per_worker if cpus_per_worker is not None else float(cfg.data.num_workers + 1)
    out = resolve(cfg.output_dir)
    # Ray Train's own run records (the trainer writes checkpoints itself): beside a local output, else local temp
    storage = out.local_path() / "ray" if out.is_local else Path(tempfile.gettempdir()) / "cnc-ray-train"
    with ray_session(address, log_to_driver=True):
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={"config": config_dict(cfg), "log_level": log_level,
                               "checkpoints_before": existing_checkpoints(cfg),
                               "fault_injection": os.environ.get(FAULT_ENV)},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name=f"cnc-train-{cfg.stage}", storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        logger.info("Ray Train: %d worker(s), %s, outputs in %s", num_workers, "GPU" if use_gpu else "CPU",
                    cfg.output_dir)
        return trainer.fit()

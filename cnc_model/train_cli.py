"""``cnc train``: train the CnC fusers on built shards (one stage per run).

    cnc train --config configs/train/local.yaml --set data.train_shards=out/build --set output_dir=out/local
    cnc train --config configs/train/local.yaml --set ... --resume latest
    cnc train --config configs/train/global.yaml --set ... --workers 8               # Ray Train, one GPU each
    accelerate launch --num_processes 8 $(which cnc) train --config ...              # or: -m cnc_model.training
    torchrun --nproc_per_node 8 -m cnc_model.training --config ...

Heavy imports happen inside the command so ``cnc --help`` stays fast.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import typer

from cnc.base.location import check_writable_output
from cnc.commands import user_errors_exit_2
from cnc.logs import quiet_library_progress, setup_logging
from cnc.options import deprecated_alias

logger = logging.getLogger(__name__)


def train_command(
    config: Path = typer.Option(..., "--config", "-c",
                                help="Training config (configs/train/{local,global,joint}.yaml)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key: --set train.max_train_steps=1000 "
                                                          "(repeatable; values parsed as YAML)."),
    resume: str = typer.Option(None, "--resume", help="'latest' or a checkpoint-N folder "
                                                      "(= --set train.resume_from_checkpoint=...)."),
    output: str = typer.Option(None, "--output", "-o", help="Output folder or URL (= --set output_dir=...)."),
    workers: int = typer.Option(0, "--workers", help="Run under Ray Train with N workers (0 = no Ray)."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (default: local/auto)."),
    ray_workers: int = typer.Option(None, "--ray-workers", hidden=True, help="Deprecated alias of --workers."),
    ray_address: str = typer.Option(None, "--ray-address", hidden=True, help="Deprecated alias of --address."),
    gpu: bool = typer.Option(True, "--gpu/--no-gpu", help="Ray workers take one GPU each."),
    max_failures: int = typer.Option(3, "--max-failures", min=0,
                                     help="Ray Train: restarts after a worker or node is lost, each resuming from the "
                                          "last checkpoint of this run."),
) -> None:
    """Train the local fuser, the global fuser, or both (stage from the config).

    Exit status: 0 done; 2 a bad config/input (one line); 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint
    (continue with --resume latest); 1 any other failure.
    """
    from cnc_model.training.config import check_tracker, load_train_config

    ray_workers = deprecated_alias(workers, ray_workers, "--ray-workers", "--workers", default=0)
    ray_address = deprecated_alias(address, ray_address, "--ray-address", "--address")
    if resume:
        overrides = [*overrides, f"train.resume_from_checkpoint={resume}"]
    if output:
        overrides = [*overrides, f"output_dir={output}"]
    cfg = load_train_config(config, overrides)  # user errors (UserError) exit 2 with one line, in cnc.cli
    check_writable_output(cfg.output_dir)
    check_tracker(cfg.train.report_to)
    if ray_workers > 0:
        from cnc_model.training.ray_train import run_ray_training

        run_ray_training(cfg, num_workers=ray_workers, use_gpu=gpu, address=ray_address, max_failures=max_failures)
        typer.echo(f"ray training finished; outputs in {cfg.output_dir}")
        return
    from cnc_model.training.trainer import train

    result = train(cfg)
    state = "interrupted" if result.interrupted else "finished"
    typer.echo(f"training {state} at step {result.global_step}; outputs in {cfg.output_dir}")
    if result.interrupted:  # 128 + signal, as the build and every shell: a preempted job is not a success
        raise typer.Exit(128 + (result.signal or signal.SIGTERM))


def register(app: typer.Typer) -> None:
    """Add ``cnc train`` to the root app."""
    app.command("train")(train_command)


def main() -> None:
    """``python -m cnc_model.training`` (the same options as ``cnc train``)."""
    setup_logging("INFO")
    quiet_library_progress()
    typer.run(user_errors_exit_2(train_command))

"""Checkpoints: only the trainable fusers + accelerate state + the data position; rotation; ``latest``.

Layout of ``OUTPUT/checkpoint-N/``::

    local_fuser/  global_fuser/      trainable modules (config.json + diffusion_pytorch_model.safetensors)
    optimizer.bin  scheduler.bin     accelerate state (+ scaler.pt with fp16); ema_<name>/ (safetensors) with EMA
    random_states_R.pkl              RNG of every process (python, numpy, torch, cuda)
    data_state_rank_R.json           data position of every process (cnc_model.data.TrainDataLoader.state_dict)
    trainer_state.json               step, stage, batches consumed -- written last: marks the checkpoint complete

The frozen UNet / VAE / text encoder are never written (they are not prepared by accelerate, and the save hook pops
the prepared fusers' weights so accelerate does not also write ``model.safetensors``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from cnc.base.location import resolve

logger = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path, complete_only: bool = True) -> list[Path]:
    """``checkpoint-N`` folders sorted by N (only those with ``trainer_state.json`` unless ``complete_only=False``)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (not complete_only or (p / TRAINER_STATE).is_file()):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(output_dir: str | Path, spec: str | None) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> newest complete checkpoint or ``None``; a path -> that folder.

    Raises:
        FileNotFoundError: when an explicit checkpoint is missing or incomplete.
    """
    if not spec:
        return None
    if spec == "latest":
        return find_latest_checkpoint(output_dir)
    p = Path(spec)
    if not p.is_absolute() and not p.exists():
        p = Path(output_dir) / spec
    if not (p / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"checkpoint {spec} not found or incomplete (no {TRAINER_STATE})")
    return p


def rotate_checkpoints(output_dir: str | Path, total_limit: int | None, keep_room: int = 1) -> list[Path]:
    """Delete the oldest checkpoints so that ``total_limit - keep_room`` remain (main process only)."""
    if total_limit is None:
        return []
    ckpts = list_checkpoints(output_dir, complete_only=False)
    excess = len(ckpts) - (total_limit - keep_room)
    removed = ckpts[:max(0, excess)]
    for p in removed:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", p.name, total_limit)
        shutil.rmtree(p, ignore_errors=True)
    return removed


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: dict) -> None:
    """Atomic (temp + fsync + rename) JSON write."""
    resolve(path).write_bytes(json.dumps(data, indent=1, sort_keys=True).encode())


def data_state_path(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"data_state_rank_{rank}.json"


def register_fuser_hooks(accelerator, names: list[str]) -> None:
    """Save/load the prepared fusers as ``save_pretrained`` folders named ``names`` (in ``prepare`` order)."""

    def save_hook(models, weights, output_dir):
        for name, model in zip(names, models):
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / name)
        for _ in range(min(len(weights), len(names))):
            weights.pop()  # accelerate would otherwise also write model.safetensors

    def load_hook(models, input_dir):
        for name in names:
            model = accelerator.unwrap_model(models.pop(0))
            loaded = type(model).from_pretrained(Path(input_dir) / name)
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

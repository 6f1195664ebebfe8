"""Checkpoints: only the trainable fusers + accelerate state + the data position; rotation; ``latest``.

Layout of ``OUTPUT/checkpoint-N/``::

    local_fuser/  global_fuser/      trainable modules (config.json + diffusion_pytorch_model.safetensors)
    optimizer.bin  scheduler.bin     accelerate state (+ scaler.pt with fp16); ema_<name>/ (safetensors) with EMA
    random_states_R.pkl              RNG of every process (python, numpy, torch, cuda)
    data_state_rank_R.json           data position of every process (cnc_model.data.TrainDataLoader.state_dict)
    trainer_state.json               step, stage, batches consumed -- written last: marks the checkpoint complete

A checkpoint is written into ``checkpoint-N.partial/`` and renamed to ``checkpoint-N`` once complete
(:func:`staged_write`, :func:`publish`): a save that fails (disk full, quota, a kill) leaves no folder under a final
name, the previous checkpoint intact, and one line saying what failed where (:class:`CheckpointWriteError`).

The frozen UNet / VAE / text encoder are never written (they are not prepared by accelerate, and the save hook pops
the prepared fusers' weights so accelerate does not also write ``model.safetensors``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

from cnc.base.errors import RunError, os_error_text
from cnc.base.location import resolve

logger = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


STAGING_SUFFIX = ".partial"
#: Below this many free bytes a failed write is reported as "disk full" (torch's zip writer drops the errno).
FULL_BELOW_BYTES = 8 * 2**20


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous one is intact."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def staging_dir(ckpt: Path) -> Path:
    """Where ``checkpoint-N`` is written before it is renamed into place (never matches :data:`CHECKPOINT_RE`)."""
    return Path(ckpt).with_name(Path(ckpt).name + STAGING_SUFFIX)


def discard(folder: Path) -> None:
    """Remove a staging folder (ours) if it exists."""
    shutil.rmtree(folder, ignore_errors=True)


def publish(staging: Path, final: Path) -> None:
    """Rename the complete ``staging`` folder to ``final`` (replacing a previous save of the same step)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        discard(old)
        final.rename(old)
        staging.rename(final)
        discard(old)
    else:
        staging.rename(final)


def write_failure(exc: BaseException, where: Path) -> str:
    """One line for a failed write under ``where``: the OSError's errno and path, ENOSPC as "disk full at PATH";
    torch's and safetensors' writers lose the errno, so a nearly full disk is named from its free space."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os_error_text(exc if exc.filename is not None else OSError(exc.errno, exc.strerror, str(where)))
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    if "code: 28" in text or "StorageFull" in text or (free is not None and free < FULL_BELOW_BYTES):
        return f"disk full at {where} ({free if free is not None else '?'} bytes free; {type(exc).__name__}: {first})"
    return f"{type(exc).__name__}: {first}"


@contextlib.contextmanager
def staged_write(final: Path, staging: Path) -> Iterator[None]:
    """Writes into ``staging`` for checkpoint ``final``: any failure removes ``staging`` and raises
    :class:`CheckpointWriteError` naming the checkpoint, the cause and the checkpoint a resume would use."""
    try:
        yield
    except (OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, CheckpointWriteError):
            raise
        reason = write_failure(exc, staging)
        discard(staging)
        previous = find_latest_checkpoint(final.parent)
        keep = f"{previous.name} is intact (--resume latest)" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write {final.name}: {reason}; {keep}") from exc


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


def rotate_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Keep the newest ``total_limit`` *complete* checkpoints; delete older complete and stale incomplete ones.

    Call it only after the new checkpoint is complete (main process only), so that a failed save (disk full,
    preemption) never leaves the run without a checkpoint to resume from. Incomplete folders (no
    ``trainer_state.json``) never count towards the limit; those older than the newest complete checkpoint are
    leftovers of failed saves and are removed, newer ones are left alone.
    """
    complete = list_checkpoints(output_dir)
    removed = complete[:max(0, len(complete) - total_limit)] if total_limit is not None else []
    newest = _step(complete[-1]) if complete else -1
    stale = [p for p in list_checkpoints(output_dir, complete_only=False)
             if not is_complete(p) and _step(p) < newest]
    for p in removed:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", p.name, total_limit)
    for p in stale:
        logger.info("removing incomplete checkpoint %s (a save that did not finish)", p.name)
    leftovers = [p for p in Path(output_dir).glob(f"checkpoint-*{STAGING_SUFFIX}") if p.is_dir()]
    for p in removed + stale + leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return removed + stale


def is_complete(ckpt: Path) -> bool:
    """A checkpoint is complete once its ``trainer_state.json`` (written last) exists."""
    return (Path(ckpt) / TRAINER_STATE).is_file()


def mark_incomplete(ckpt: Path) -> None:
    """Drop ``trainer_state.json`` before (re)writing a checkpoint folder, so a half-overwritten one never looks
    complete (main process only, before ``save_state``)."""
    (Path(ckpt) / TRAINER_STATE).unlink(missing_ok=True)


def _step(ckpt: Path) -> int:
    return int(CHECKPOINT_RE.match(Path(ckpt).name).group(1))


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # header + declared sizes vs. the file size
        f.keys()


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (truncated, bad header), or ``None``. Reads the header only."""
    try:
        _check_safetensors(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure means "damaged"
        text = str(exc).strip()
        return f"{path} is unreadable ({type(exc).__name__}: {text.splitlines()[0] if text else ''})"
    return None


def _check_torch_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as z:  # a cut file has no central directory at its end
        bad = z.testzip() if path.stat().st_size < 64 * 2**20 else None
    if bad is not None:
        raise ValueError(f"member {bad} fails its CRC")


def checkpoint_problems(ckpt: Path) -> list[str]:
    """Why a complete-looking checkpoint cannot be loaded (empty list: it can): truncated or unreadable
    safetensors, ``optimizer.bin``/``scheduler.bin``/``scaler.pt``, ``trainer_state.json`` or ``data_state``
    files. Cheap: headers, zip directories and JSON only (never the unsafe pickle path)."""
    ckpt, problems = Path(ckpt), []
    checks = [(p, _check_safetensors) for p in sorted(ckpt.rglob("*.safetensors"))]
    checks += [(ckpt / n, _check_torch_zip) for n in ("optimizer.bin", "scheduler.bin", "scaler.pt")
               if (ckpt / n).exists() or n == "optimizer.bin"]
    checks += [(p, read_json) for p in [ckpt / TRAINER_STATE, *sorted(ckpt.glob("data_state_rank_*.json"))]]
    for path, check in checks:
        try:
            check(path)
        except FileNotFoundError:
            problems.append(f"{path.relative_to(ckpt)} is missing")
        except Exception as exc:  # noqa: BLE001 - any reader failure means "damaged"
            problems.append(f"{path.relative_to(ckpt)} is unreadable ({type(exc).__name__}: {exc})")
    return problems


def rng_state_problem(ckpt: Path, process_index: int) -> str | None:
    """Why ``random_states_<rank>.pkl`` cannot restore the RNGs (``None``: it can).

    accelerate swallows this failure with an info line and resumes with fresh RNGs; the trainer warns loudly.
    """
    from accelerate.utils.other import load

    path = Path(ckpt) / f"random_states_{process_index}.pkl"
    try:
        states = load(path)
    except Exception as exc:  # noqa: BLE001
        return f"{path.name} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    missing = [k for k in ("random_state", "numpy_random_seed", "torch_manual_seed") if k not in states]
    return f"{path.name} lacks {missing}" if missing else None


def resume_candidates(output_dir: str | Path, spec: str | None) -> Iterator[Path]:
    """Checkpoints to try for ``spec``, best first, skipping damaged ones with a warning.

    ``"latest"``: the complete checkpoints, newest first (a truncated newest one falls back to the previous);
    a path: only that one.

    Raises:
        FileNotFoundError: an explicit checkpoint is missing, incomplete or damaged.
    """
    if not spec:
        return
    paths = list(reversed(list_checkpoints(output_dir))) if spec == "latest" else [resolve_resume(output_dir, spec)]
    for path in paths:
        problems = checkpoint_problems(path)
        if not problems:
            yield path
            continue
        if spec != "latest":
            raise FileNotFoundError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
        logger.warning("checkpoint %s is damaged (%s): falling back to the previous complete checkpoint",
                       path, "; ".join(problems))


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

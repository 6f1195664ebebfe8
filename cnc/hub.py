"""Fail-fast resolution of model weights.

Every configured model is checked at start-up, before any work: ``tiny`` resolves to the seeded tiny
checkpoint of that config key, written once into the cnc cache (:mod:`cnc.tiny_store`); a local folder/file is
used as is; a known downloadable file (the SAM checkpoints, :mod:`cnc.downloads`) is looked up in the cnc cache
(``cnc models download`` puts it there); a hub id must be in the local Hugging Face cache or the hub must answer.
If not,
:class:`~triplets.errors.ModelUnavailableError` says in one line which model and which
config key to set — never a traceback an hour into a run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cnc.base.errors import ModelUnavailableError
from cnc.downloads import cached_file, known_file
from cnc.tiny_store import KIND_OF_KEY, materialize

log = logging.getLogger(__name__)
#: The config value of every model key that selects the seeded tiny model (tests, ``make demo MODELS=tiny``).
TINY = "tiny"


def _hint(model_id: str, config_key: str) -> str:
    return (f"model '{model_id}' (config key {config_key}) is not available: not a local path, not in the Hugging "
            f"Face cache, and the hub cannot be reached. Download it and set {config_key}=/path/to/it "
            f"(or fetch it: cnc models download --config CONFIG; or run with tiny models: make demo MODELS=tiny / "
            f"--config tiny)")


def resolve_pretrained(model_id: str, config_key: str, *, is_file: bool = False, seed: int = 0,
                       revision: str | None = None) -> str:
    """Return what ``from_pretrained`` (or ``torch.load`` for ``is_file``) should load: always a local path,
    except a hub id that is not cached yet while the hub answers (``from_pretrained`` downloads it).

    Args:
        model_id: ``tiny``, a local path, a known file name (e.g. ``sam_vit_h_4b8939.pth``) or a hub repo id.
        config_key: the config key naming it (for the error message and the kind of tiny model).
        is_file: the model is a single checkpoint file (SAM); hub ids are not allowed.
        seed: seed of the tiny model (``model_id == "tiny"`` only).
        revision: hub revision (branch, tag or commit) to look up in the cache.

    Raises:
        ModelUnavailableError: one line naming the model and the config key.
    """
    if model_id == TINY:
        return str(materialize(KIND_OF_KEY.get(config_key, config_key), seed))
    path = Path(model_id).expanduser()
    if path.exists():
        return str(path)
    if is_file:
        spec = known_file(model_id)
        if spec is not None and (cached := cached_file(spec)) is not None:
            return str(cached)
        how = (f"fetch it with `cnc models download` ({spec.url}) or set {config_key}=/path/to/file"
               if spec is not None else f"download the checkpoint and set {config_key}=/path/to/file")
        raise ModelUnavailableError(
            f"model file '{model_id}' (config key {config_key}) does not exist: {how} "
            f"(or use {config_key}=tiny for a random tiny model)")
    if model_id.startswith(("/", "./", "../", "~")):
        raise ModelUnavailableError(f"model folder '{model_id}' (config key {config_key}) does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached; try the hub below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelUnavailableError(_hint(model_id, config_key))
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model_id, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot get it
        log.debug("hub check of %s failed: %s", model_id, exc)
        raise ModelUnavailableError(_hint(model_id, config_key)) from None
    return model_id


def resolve_all(models: dict[str, str], *, files: tuple[str, ...] = (), seed: int = 0) -> dict[str, str]:
    """Check every model at once, before anything loads: config key (or option) → what to load.

    The one up-front check of ``cnc build``, ``cnc sample`` and ``cnc eval`` (a missing model costs seconds, not a
    minute of hub retries inside ``from_pretrained``).

    Args:
        models: config key or option (``depth.model``, ``--depth-model``) → model id, local path or ``tiny``.
        files: the keys that name a single checkpoint file (SAM, U²-Net).
        seed: seed of the tiny models.

    Raises:
        ModelUnavailableError: one line per missing model, each naming the model and its key.
    """
    resolved, missing = {}, []
    for key, mid in models.items():
        try:
            resolved[key] = resolve_pretrained(mid, key, is_file=key in files, seed=seed)
        except ModelUnavailableError as exc:
            missing.append(str(exc))
    if missing:
        raise ModelUnavailableError("\n".join(dict.fromkeys(missing)))
    return resolved

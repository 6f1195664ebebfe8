"""Fail-fast resolution of model weights.

Every configured model is checked at start-up, before any work: a local folder/file is
used as is; a hub id must be in the local Hugging Face cache or the hub must answer. If not,
:class:`~triplets.errors.ModelUnavailableError` says in one line which model and which
config key to set — never a traceback an hour into a run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from triplets.errors import ModelUnavailableError

log = logging.getLogger(__name__)
TINY = "tiny"


def _hint(model_id: str, config_key: str) -> str:
    return (f"model '{model_id}' (config key {config_key}) is not available: not a local path, not in the Hugging "
            f"Face cache, and the hub cannot be reached. Download it and set {config_key}=/path/to/it "
            f"(or run with tiny models: make demo MODELS=tiny / --config configs/build/tiny.yaml)")


def resolve_pretrained(model_id: str, config_key: str, *, is_file: bool = False) -> str:
    """Return what ``from_pretrained`` (or ``torch.load`` for ``is_file``) should load.

    Args:
        model_id: ``tiny``, a local path, or a hub repo id.
        config_key: the config key naming it (for the error message).
        is_file: the model is a single local checkpoint file (SAM); hub ids are not allowed.

    Raises:
        ModelUnavailableError: one line naming the model and the config key.
    """
    if model_id == TINY:
        return TINY
    path = Path(model_id).expanduser()
    if path.exists():
        return str(path)
    if is_file:
        raise ModelUnavailableError(
            f"model file '{model_id}' (config key {config_key}) does not exist: download the checkpoint and set "
            f"{config_key}=/path/to/file (or use {config_key}=tiny for a random tiny model)")
    if model_id.startswith(("/", "./", "../", "~")):
        raise ModelUnavailableError(f"model folder '{model_id}' (config key {config_key}) does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, local_files_only=True)
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

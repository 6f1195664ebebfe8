"""What a training run started from: identities of the base model and the initial fusers, hashes of shard manifests.

Recorded under ``provenance`` in ``OUTPUT/train_config.yaml`` and as ``provenance.json`` in every checkpoint.
``--resume`` refuses a checkpoint whose base model identity differs from the one this run loads
(:class:`ModelChangedError`, exit 2): fusers trained against other frozen weights do not fit them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from cnc.base.errors import UserError
from cnc.base.location import resolve
from cnc.identity import local_identity, model_identity
from cnc_model.training.components import fuser_folder
from cnc_model.training.config import TrainConfig

logger = logging.getLogger(__name__)
PROVENANCE_FILE = "provenance.json"
BASE_KEY = "model.pretrained_model_name_or_path"


class ModelChangedError(UserError, ValueError):
    """A resume would continue on a base model other than the one the checkpoint was trained on."""


def _manifest_hashes(shards: list[str]) -> dict[str, str | None]:
    """sha256 of ``manifest.json`` of every build folder (local or URL) in ``data.train_shards`` (``None`` for
    globs, patterns, single tars and ``pipe:`` specs)."""
    out: dict[str, str | None] = {}
    for entry in shards:
        out[entry] = None
        if entry.startswith("pipe:") or any(c in entry for c in "*?[{"):
            continue
        try:
            from triplets.shardio import BuildOutput
            from triplets.shardio.names import MANIFEST_FILE

            manifest = BuildOutput(resolve(entry)).file(MANIFEST_FILE)  # _cnc/manifest.json, or the legacy place
            if manifest.isfile():
                out[entry] = hashlib.sha256(manifest.read_bytes()).hexdigest()
        except (UserError, OSError):
            continue
    return out


def training_provenance(cfg: TrainConfig, base_resolved: str | None) -> dict:
    """``{"models": {key: identity record}, "shard_manifests": {entry: sha256 | None}}``.

    Args:
        cfg: the run's config.
        base_resolved: what the base model resolved to (``None`` when the caller injected components).
    """
    m = cfg.model
    models: dict[str, dict | None] = {
        BASE_KEY: model_identity(m.pretrained_model_name_or_path, base_resolved) if base_resolved else None}
    for name, value in (("local_fuser", m.local_fuser), ("global_fuser", m.global_fuser)):
        if value:  # the fuser folder itself, also when the config names a run's output folder holding it
            folder = fuser_folder(value, name, f"model.{name}")
            models[f"model.{name}"] = {"id": value, "revision": None, "identity": local_identity(folder)}
    return {"models": models, "shard_manifests": _manifest_hashes(cfg.data.train_shards)}


def write_checkpoint_provenance(checkpoint: Path, provenance: dict) -> None:
    """``checkpoint/provenance.json``."""
    resolve(checkpoint / PROVENANCE_FILE).write_json(provenance, indent=2)


def check_resume(checkpoint: Path, provenance: dict) -> None:
    """Refuse to resume ``checkpoint`` when its base model identity differs from this run's.

    Raises:
        ModelChangedError: one line naming the key, the checkpoint's identity and the current one.
    """
    path = checkpoint / PROVENANCE_FILE
    if not path.is_file():
        logger.warning("%s records no model identities (older checkpoint): the base model is not checked", checkpoint)
        return
    old = (json.loads(path.read_text(encoding="utf-8")).get("models") or {}).get(BASE_KEY) or {}
    new = (provenance.get("models") or {}).get(BASE_KEY) or {}
    a, b = old.get("identity"), new.get("identity")
    if a and b and a != b:
        raise ModelChangedError(f"checkpoint {checkpoint} was trained on {BASE_KEY} identity {a}, this run loads "
                                f"{b} ({new.get('id')}); resume with the original base model or start a new "
                                f"output_dir")

"""What a training run started from: identities of the base model and the initial fusers, hashes of shard manifests.

Recorded under ``provenance`` in ``OUTPUT/train_config.yaml`` and as ``provenance.json`` in every checkpoint.
``--resume`` refuses a checkpoint whose base model or frozen UNet (``model.unet``) identity differs from the one this
run loads (:class:`ModelChangedError`, exit 2): fusers trained against other frozen weights do not fit them.
``conditions`` records the build settings of the training shards (:func:`triplets.conditions.training_conditions`),
which ``cnc sample`` / ``cnc eval`` make their conditions with by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import yaml

from cnc.base.errors import UserError
from cnc.base.location import resolve
from cnc.identity import local_identity, model_identity
from cnc_model.training.components import UNET_KEY, fuser_folder, unet_folder
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
    """``{"models": {key: identity record}, "shard_manifests": {entry: sha256 | None}, "conditions": {...}}``.

    Args:
        cfg: the run's config.
        base_resolved: what the base model resolved to (``None`` when the caller injected components).
    """
    from triplets.conditions import training_conditions

    m = cfg.model
    models: dict[str, dict | None] = {
        BASE_KEY: model_identity(m.pretrained_model_name_or_path, base_resolved) if base_resolved else None}
    if m.unet:  # the frozen UNet replacing the base's unet/ (fails fast, one line, when it is not a UNet folder)
        models[UNET_KEY] = {"id": m.unet, "revision": None, "identity": local_identity(unet_folder(m.unet, UNET_KEY))}
    for name, value in (("local_fuser", m.local_fuser), ("global_fuser", m.global_fuser)):
        if value:  # the fuser folder itself, also when the config names a run's output folder holding it
            folder = fuser_folder(value, name, f"model.{name}")
            models[f"model.{name}"] = {"id": value, "revision": None, "identity": local_identity(folder)}
            if base_resolved:
                check_fuser_base(folder, f"model.{name}", models)
    conditions = training_conditions(cfg.data.train_shards)
    for note in conditions["notes"]:
        logger.info("training conditions: %s", note)
    return {"models": models, "shard_manifests": _manifest_hashes(cfg.data.train_shards), "conditions": conditions}


def frozen_unet(provenance: dict | None) -> tuple[str, str | None] | None:
    """``(key, identity)`` of the frozen UNet a run trained against: ``model.unet`` when set, else the base model."""
    models = (provenance or {}).get("models") or {}
    for key in (UNET_KEY, BASE_KEY):
        if models.get(key):
            return key, models[key].get("identity")
    return None


def check_fuser_base(folder: Path, key: str, models: dict) -> None:
    """A fuser that starts from another run must have been trained against the frozen UNet this run loads (the
    reference's ``integrate`` step asserts the same frozen weights).

    Raises:
        ModelChangedError: the fuser's run recorded another identity for the same key (one line).
    """
    theirs = frozen_unet(read_provenance(folder.parent))  # the run (or checkpoint) the fuser folder belongs to
    ours = frozen_unet({"models": models})
    if theirs is None or ours is None or None in (theirs[1], ours[1]):
        return
    if theirs[0] != ours[0]:
        logger.warning("%s was trained against %s %s, this run loads %s %s: make sure they are the same weights",
                       key, theirs[0], theirs[1], ours[0], ours[1])
    elif theirs[1] != ours[1]:
        raise ModelChangedError(f"{key} {folder} was trained against {theirs[0]} identity {theirs[1]}, this run "
                                f"loads {ours[1]}: its fuser does not fit another frozen UNet (set {theirs[0]} as "
                                f"that run did)")


def read_provenance(folder: Path) -> dict | None:
    """The provenance of a run folder (``train_config.yaml``'s ``provenance``) or of a checkpoint folder (its
    ``provenance.json``, else the run's); ``None`` when none is recorded."""

    folder = Path(folder)
    path = folder / PROVENANCE_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    for config in (folder / "train_config.yaml", folder.parent / "train_config.yaml"):
        if config.is_file():
            data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            return data.get("provenance") if isinstance(data, dict) else None
    return None


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
    recorded = json.loads(path.read_text(encoding="utf-8")).get("models") or {}
    current = provenance.get("models") or {}
    for key in (BASE_KEY, UNET_KEY):
        old, new = recorded.get(key) or {}, current.get(key) or {}
        a, b = old.get("identity"), new.get("identity")
        if key == UNET_KEY and (key in recorded) != (key in current):
            a, b = a or "the base model's unet/", b or "the base model's unet/"
        if a and b and a != b:
            raise ModelChangedError(f"checkpoint {checkpoint} was trained on {key} identity {a}, this run loads "
                                    f"{b} ({new.get('id')}); resume with the original model or start a new "
                                    f"output_dir")

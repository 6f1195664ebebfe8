"""``cnc push``: publish a build folder as a Hugging Face dataset repo, or an exported pipeline as a model repo.

What is pushed is decided from the folder:

* a **build folder** (``cnc build``, ``cnc filter``, ``cnc score``: tars at the top, ``_cnc/manifest.json``) → a
  dataset repo: the tars and ``_cnc/`` (plan, config, markers, errors, manifest = wids index; not the ``cnc inspect``
  report under ``_cnc/inspect/``), then the dataset card (``_cnc/README.md``, a :class:`huggingface_hub.DatasetCard`
  whose metadata names the tars as the ``train`` split) as the repo's ``README.md``;
* a **pipeline folder** (``cnc export``: ``model_index.json``) → a model repo: every file, the component entry
  points diffusers needs to load a Hub repo's own components (:func:`cnc_model.card.component_shims`), then the model
  card (:mod:`cnc_model.card`: ``library_name: diffusers``, ``pipeline_tag: text-to-image``, ``base_model``,
  ``datasets``, ``tags``, ``license``) as ``README.md``.

Both use ``huggingface_hub``: ``create_repo(exist_ok=True)``, then ``upload_folder`` — resumable: a rerun after an
interruption skips the files the repo already holds (the Hub reports their hashes) and commits the rest — then the
card's ``push_to_hub`` (validated by the Hub first). The endpoint and token are huggingface_hub's own (``HF_ENDPOINT``,
``HF_TOKEN`` / ``hf auth login``); nothing is pushed with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cnc.base.errors import UserError
from cnc_model.card import component_shims, model_card_data

log = logging.getLogger(__name__)
#: Never uploaded from a build folder: the build lock and probes, temporaries, the inspect report.
BUILD_IGNORE = [".lock", ".probe-*", "**/*.tmp", "*.tmp", "_cnc/inspect/**", "_photos/**", "README.md"]
#: Never uploaded from a pipeline folder (the card is pushed on its own, after the files).
PIPELINE_IGNORE = ["**/*.tmp", "*.tmp", "README.md"]


class PushError(UserError):
    """The folder cannot be pushed as it is, or the Hub refused (one line)."""


@dataclass
class PushResult:
    """What ``cnc push`` did: the repo (``kind``: ``dataset`` or ``model``), its URL and the commit URLs."""

    repo_id: str
    kind: str
    url: str
    commits: list[str] = field(default_factory=list)


def folder_kind(folder: Path) -> str:
    """``dataset`` (a build folder) or ``model`` (a pipeline folder).

    Raises:
        PushError: neither (a ``cnc train`` run or checkpoint must be exported first).
    """
    if (folder / "model_index.json").is_file():
        return "model"
    if any(folder.glob("*.tar")) and ((folder / "_cnc" / "manifest.json").is_file()
                                      or (folder / "manifest.json").is_file()):
        return "dataset"
    if (folder / "train_config.yaml").is_file() or (folder / "trainer_state.json").is_file():
        raise PushError(f"{folder} is a cnc train run or checkpoint: export it first (cnc export {folder} "
                        "--output DIR), then push DIR")
    raise PushError(f"{folder} is neither a build folder (tars + _cnc/manifest.json) nor a pipeline folder "
                    "(model_index.json)")


def dataset_card(folder: Path, license: str | None = None):
    """The build's card (``_cnc/README.md``, written when missing) as a :class:`huggingface_hub.DatasetCard`."""
    from huggingface_hub import DatasetCard

    from triplets.card import write_card
    from triplets.shardio import BuildOutput
    from triplets.shardio.names import CARD_FILE

    out = BuildOutput(str(folder))
    path = out.file(CARD_FILE)
    if not path.isfile():
        write_card(out)
    card = DatasetCard(path.read_text())
    if license:
        card.data.license = license
    return card


def model_card(folder: Path, datasets: list[str] | None = None, license: str | None = None):
    """The export's ``README.md`` as a :class:`huggingface_hub.ModelCard`, with ``datasets`` / ``license`` applied
    (an export without metadata gets the :mod:`cnc_model.card` metadata)."""
    from huggingface_hub import ModelCard

    readme = folder / "README.md"
    card = ModelCard(readme.read_text()) if readme.is_file() else ModelCard("# CnC pipeline\n")
    if card.data.library_name is None:
        meta = folder / "cnc_export.json"
        base = json.loads(meta.read_text()).get("base_model") if meta.is_file() else None
        defaults = model_card_data(base_model=base).to_dict()
        for key, value in defaults.items():
            if getattr(card.data, key, None) is None:
                setattr(card.data, key, value)
    if datasets:
        card.data.datasets = list(datasets)
    if license:
        card.data.license = license
    return card


def push(folder: str | Path, repo_id: str, *, private: bool = False, datasets: list[str] | None = None,
         license: str | None = None, revision: str | None = None, token: str | None = None,
         commit_message: str | None = None) -> PushResult:
    """Create ``repo_id`` if needed and upload ``folder`` to it (see the module docstring).

    Raises:
        PushError: the folder is not pushable, the Hub is unreachable or refuses (one line).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise PushError("HF_HUB_OFFLINE is set: nothing can be pushed (unset it, or push from a machine with "
                        "network)")
    kind = folder_kind(folder)
    if kind == "dataset" and datasets:
        raise PushError("--dataset names the training data of a model; a build folder is itself the dataset")
    card = dataset_card(folder, license) if kind == "dataset" else model_card(folder, datasets, license)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    message = commit_message or f"cnc push {folder.name}"
    try:
        url = api.create_repo(repo_id, repo_type=kind, private=private, exist_ok=True)
        log.info("uploading %s to %s %s (files the repo already holds are skipped)", folder, kind, repo_id)
        info = api.upload_folder(repo_id=repo_id, repo_type=kind, folder_path=str(folder), revision=revision,
                                 commit_message=message,
                                 ignore_patterns=BUILD_IGNORE if kind == "dataset" else PIPELINE_IGNORE)
        if kind == "model":
            _push_component_shims(api, folder, repo_id, revision, message)
        card_url = card.push_to_hub(repo_id, token=token, repo_type=kind, revision=revision,
                                    commit_message=f"{message}: card")
    except (HfHubHTTPError, *_transport_errors(), OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PushError(f"push of {folder} to {kind} repo {repo_id} failed: {first}") from None
    return PushResult(repo_id=repo_id, kind=kind, url=str(url), commits=[info.commit_url, card_url])


def _push_component_shims(api, folder: Path, repo_id: str, revision: str | None, message: str) -> None:
    """Commit the component entry points of a pipeline's ``model_index.json`` (skipped when the repo holds them)."""
    from huggingface_hub import CommitOperationAdd

    shims = component_shims(json.loads((folder / "model_index.json").read_text()))
    have = set(api.list_repo_files(repo_id, repo_type="model", revision=revision))
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src.encode()) for rel, src in shims.items()
           if rel not in have]
    if ops:
        api.create_commit(repo_id, operations=ops, commit_message=f"{message}: component entry points",
                          repo_type="model", revision=revision)


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's connection errors (huggingface_hub uses httpx, or its fork httpx2, by version)."""
    return tuple(importlib.import_module(m).HTTPError for m in ("httpx2", "httpx") if importlib.util.find_spec(m))


__all__ = ["PushError", "PushResult", "dataset_card", "folder_kind", "model_card", "push"]

"""The model card of an exported pipeline (``README.md`` with Hub metadata) and its diffusers entry point.

``cnc export`` writes, beside ``model_index.json``:

* ``README.md``: a :class:`huggingface_hub.ModelCard` whose metadata the Hub reads — ``library_name: diffusers``,
  ``pipeline_tag: text-to-image``, ``base_model`` (the run's SD 1.5 base when it is a hub id), ``datasets`` (the hub
  ids of the training data, when given), ``tags`` and ``license`` — and the text of
  :func:`cnc_model.loading.model_card` (stage, steps, weights, training shards, config);
* ``pipeline_cnc.py`` (:data:`PIPELINE_FILE`): the custom-pipeline entry point diffusers documents for community
  pipelines, so the folder or its Hub repo loads with
  ``DiffusionPipeline.from_pretrained(path_or_repo, custom_pipeline="pipeline_cnc", trust_remote_code=True)``.
  It imports :class:`~cnc_model.pipeline_cnc.CnCPipeline` from the installed ``cnc`` package (``pip install cnc``):
  the pipeline's code is not copied into the model repo. ``CnCPipeline.from_pretrained(path)`` needs neither.

``cnc push`` adds to the model repo (never to the local folder) one ``<component>/<module>.py`` per component of ours
in ``model_index.json`` (:func:`component_shims`, e.g. ``local_fuser/cnc_model.models.local_fuser.py``): diffusers
loads a Hub repo's non-diffusers components only from such files, with ``trust_remote_code=True``, so a repo loads
with the call above or ``CnCPipeline.from_pretrained(repo, trust_remote_code=True)``. Each file imports the class
from the installed package. (In a local folder the same files would make every load need ``trust_remote_code``.)
"""

from __future__ import annotations

import re
from pathlib import Path

#: The custom-pipeline module written into an exported folder (``custom_pipeline="pipeline_cnc"``).
PIPELINE_FILE = "pipeline_cnc.py"
CUSTOM_PIPELINE = PIPELINE_FILE.removesuffix(".py")
#: Licence of the exported weights by default: the exported folder holds the SD 1.5 parts, under this licence.
DEFAULT_LICENSE = "creativeml-openrail-m"
TAGS = ["compose-and-conquer", "cnc", "depth-conditioning", "text-to-image", "diffusers"]

PIPELINE_SHIM = '''"""Compose and Conquer (CnC) pipeline for diffusers' custom-pipeline loading (by `cnc export`).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(PATH_OR_REPO, custom_pipeline="pipeline_cnc", trust_remote_code=True)

The pipeline's code comes from the `cnc` package (pip install cnc); this file only names it. The components
recorded in model_index.json (cnc_model.models.local_fuser.LocalFuser, cnc_model.models.global_fuser.GlobalFuser)
are imported with it.
"""

from cnc_model.pipeline_cnc import CnCPipeline

__all__ = ["CnCPipeline"]
'''

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_or_none(spec: str | None) -> str | None:
    """``spec`` when it is a Hub repo id (``org/name``, not an existing local path, not ``tiny``), else ``None``."""
    if not spec or spec == "tiny" or not _HUB_ID.match(spec) or Path(spec).expanduser().exists():
        return None
    return spec


def model_card_data(base_model: str | None = None, datasets: list[str] | None = None,
                    license: str | None = None, tags: list[str] | None = None):
    """The Hub metadata of an exported CnC pipeline (a :class:`huggingface_hub.ModelCardData`)."""
    from huggingface_hub import ModelCardData

    return ModelCardData(library_name="diffusers", pipeline_tag="text-to-image",
                         base_model=hub_id_or_none(base_model), datasets=list(datasets) if datasets else None,
                         license=license or DEFAULT_LICENSE, tags=list(dict.fromkeys([*TAGS, *(tags or [])])))


def usage_text() -> str:
    return ("## Use\n\n"
            "```python\n"
            "# pip install cnc  (the CnC pipeline code)\n"
            "from cnc_model.pipeline_cnc import CnCPipeline\n"
            "pipe = CnCPipeline.from_pretrained(\"PATH_OR_REPO\")\n\n"
            "# or through diffusers' custom-pipeline loading\n"
            "from diffusers import DiffusionPipeline\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_REPO\", custom_pipeline=\"{CUSTOM_PIPELINE}\", "
            "trust_remote_code=True)\n"
            "```\n\n"
            "Sampling from two photos: `cnc sample PATH --prompt ... --fg fg.jpg --bg bg.jpg` "
            "(the cnc README, *Sample from CnC*).\n")


def pipeline_card(text: str, *, base_model: str | None = None, datasets: list[str] | None = None,
                  license: str | None = None):
    """A :class:`huggingface_hub.ModelCard` of the exported pipeline: metadata + ``text`` + how to load it."""
    from huggingface_hub import ModelCard

    data = model_card_data(base_model, datasets, license)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text.rstrip()}\n\n{usage_text()}")


def component_shims(model_index: dict) -> dict[str, str]:
    """``{relative path: source}`` of the component entry points (see the module docstring): one per component whose
    class lives in this project (``["cnc_model.models.local_fuser", "LocalFuser"]``)."""
    out = {}
    for name, spec in model_index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        module, cls = spec
        if module.split(".")[0] == "cnc_model":
            out[f"{name}/{module}.py"] = (f'"""The {name} component for diffusers\' custom-component loading (by cnc '
                                          f'export; pip install cnc)."""\n\nfrom {module} import {cls}\n\n'
                                          f'__all__ = ["{cls}"]\n')
    return out


def write_pipeline_files(folder: str | Path, text: str, *, base_model: str | None = None,
                         datasets: list[str] | None = None, license: str | None = None) -> None:
    """Write ``README.md`` (:func:`pipeline_card`) and :data:`PIPELINE_FILE` into a saved pipeline folder."""
    folder = Path(folder)
    pipeline_card(text, base_model=base_model, datasets=datasets, license=license).save(folder / "README.md")
    (folder / PIPELINE_FILE).write_text(PIPELINE_SHIM, encoding="utf-8")


__all__ = ["CUSTOM_PIPELINE", "DEFAULT_LICENSE", "PIPELINE_FILE", "component_shims", "hub_id_or_none",
           "model_card_data", "pipeline_card", "write_pipeline_files"]

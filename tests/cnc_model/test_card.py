"""The exported pipeline's model card (Hub metadata) and its diffusers entry points, on known inputs."""

from __future__ import annotations

from cnc_model.card import PIPELINE_SHIM, component_shims, hub_id_or_none, pipeline_card


def test_base_model_is_named_only_when_it_is_a_hub_id(tmp_path):
    assert hub_id_or_none("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    (tmp_path / "sd").mkdir()
    for spec in ("tiny", None, "", str(tmp_path / "sd"), "/models/sd15", "a/b/c", "./x/y"):
        assert hub_id_or_none(spec) is None, spec


def test_card_metadata_and_text():
    from huggingface_hub import ModelCard

    card = ModelCard(str(pipeline_card("# CnC joint\n\nsteps: 7", base_model="org/sd15", datasets=["me/triplets"],
                                       license="mit")))
    d = card.data
    assert (d.library_name, d.pipeline_tag, d.base_model, d.datasets, d.license) == (
        "diffusers", "text-to-image", "org/sd15", ["me/triplets"], "mit")
    assert "compose-and-conquer" in d.tags and "steps: 7" in card.text
    assert 'custom_pipeline="pipeline_cnc", trust_remote_code=True' in card.text
    default = pipeline_card("x").data
    assert default.license == "creativeml-openrail-m" and default.base_model is None and default.datasets is None


def test_entry_points_import_the_installed_classes():
    index = {"_class_name": "CnCPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "local_fuser": ["cnc_model.models.local_fuser", "LocalFuser"], "image_encoder": [None, None],
             "global_fuser": ["cnc_model.models.global_fuser", "GlobalFuser"]}
    shims = component_shims(index)
    assert set(shims) == {"local_fuser/cnc_model.models.local_fuser.py", "global_fuser/cnc_model.models.global_fuser.py"}
    scope: dict = {}
    exec(shims["local_fuser/cnc_model.models.local_fuser.py"], scope)  # noqa: S102 - our own generated source
    from cnc_model.models.local_fuser import LocalFuser
    from cnc_model.pipeline_cnc import CnCPipeline

    assert scope["LocalFuser"] is LocalFuser
    exec(PIPELINE_SHIM, scope)  # noqa: S102
    assert scope["CnCPipeline"] is CnCPipeline

"""The CnC model on diffusers: local fuser, global fuser, soft guidance, pipeline (and, later, the trainer).

Imports are lazy so ``import cnc_model`` stays cheap (no torch/diffusers until a name is used).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LocalFuser": "cnc_model.models.local_fuser",
    "LocalFuserOutput": "cnc_model.models.local_fuser",
    "GlobalFuser": "cnc_model.models.global_fuser",
    "FDN": "cnc_model.models.fdn",
    "FDNResnetBlock2D": "cnc_model.models.fdn",
    "DepthFeatureExtractor": "cnc_model.models.depth_extractor",
    "run_frozen_unet": "cnc_model.models.frozen_unet",
    "SoftGuidanceAttnProcessor": "cnc_model.attention",
    "SoftGuidanceMask": "cnc_model.attention",
    "install_soft_guidance": "cnc_model.attention",
    "CnCDenoiser": "cnc_model.denoiser",
    "load_pipeline": "cnc_model.loading",
    "export_pipeline": "cnc_model.loading",
    "CnCPipeline": "cnc_model.pipeline_cnc",
    "CnCPipelineOutput": "cnc_model.pipeline_cnc",
    "compose": "cnc_model.compose",
    "convert_reference_checkpoint": "cnc_model.convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cnc_model' has no attribute {name!r}")

"""CnC model components (module paths are recorded in saved pipelines' ``model_index.json``: keep them stable)."""

from cnc_model.models.depth_extractor import DepthFeatureExtractor, default_inject_channels
from cnc_model.models.fdn import FDN, FDNResnetBlock2D
from cnc_model.models.frozen_unet import run_frozen_unet
from cnc_model.models.global_fuser import GlobalFuser
from cnc_model.models.local_fuser import LocalFuser, LocalFuserOutput

__all__ = [
    "FDN", "FDNResnetBlock2D", "DepthFeatureExtractor", "default_inject_channels", "LocalFuser", "LocalFuserOutput",
    "GlobalFuser", "run_frozen_unet",
]

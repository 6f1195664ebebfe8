"""The per-sample stages: load → segment → inpaint → depth → embed (see :mod:`triplets.builder`)."""

from triplets.stages.base import Stage
from triplets.stages.depth import DepthStage, DPTDepth
from triplets.stages.embed import CLIPImageEmbedder, EmbedStage
from triplets.stages.inpaint import InpaintStage, sample_seed
from triplets.stages.load import LoadStage
from triplets.stages.segment import SEGMENTERS, SegmentStage, register_segmenter
from triplets.stages.u2net import U2NetSegmenter  # registers segment.backend "u2net"

__all__ = [
    "Stage", "LoadStage", "SegmentStage", "InpaintStage", "DepthStage", "EmbedStage", "DPTDepth",
    "CLIPImageEmbedder", "SEGMENTERS", "register_segmenter", "sample_seed", "U2NetSegmenter",
]

"""Tiny, seeded, random-initialised models built from in-code configs (no network).

Used by the tests and by ``MODELS=tiny`` runs on machines without the real weights. Every
builder seeds torch before constructing, so the same call always gives the same weights.
The architectures are the real classes (diffusers / transformers / segment-anything) at
toy sizes, so the code paths exercised are the production ones.

Sizes: images are meant to be 64-128 px in tests. The VAE has 4 blocks, so its scale
factor is 8 like SD's (a 64 px image gives an 8x8 latent).
"""

from __future__ import annotations

import functools
import json
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

#: Width of the tiny text encoder / cross-attention.
TINY_CROSS_ATTENTION_DIM = 32
#: Width of the tiny CLIP image embedding (``image_embeds``).
TINY_IMAGE_EMBED_DIM = 32

_VOCAB = [
    "l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
    "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>",
]
_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def write_tiny_tokenizer_files(directory: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the offline CLIP test tokenizer into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(_VOCAB)}))
    (directory / "merges.txt").write_text("\n".join(_MERGES) + "\n")
    return directory


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    return str(write_tiny_tokenizer_files(tempfile.mkdtemp(prefix="cnc-tiny-tok-")))


def tiny_tokenizer():
    """CLIP tokenizer from local files only; ``model_max_length=77``, ids come out ``(B, 77)``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_tokenizer_dir(), model_max_length=77)


def tiny_text_encoder(seed: int = 0):
    """``CLIPTextModel`` with hidden size 32, 5 layers, vocab 1000."""
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(seed)
    cfg = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=TINY_CROSS_ATTENTION_DIM, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000,
    )
    return CLIPTextModel(cfg).eval()


def tiny_vae(seed: int = 0):
    """4-block ``AutoencoderKL`` (scale factor 8, 4 latent channels)."""
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16, 16, 16], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, norm_num_groups=8, sample_size=64,
    ).eval()


def tiny_unet_config(in_channels: int = 4) -> dict:
    """Config of the tiny CnC/SD UNet: 2 levels (32, 64), 2 layers per block, 8 groups, context 32."""
    return dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_unet(in_channels: int = 4, seed: int = 0):
    """``UNet2DConditionModel`` from :func:`tiny_unet_config` (``in_channels=9`` for inpainting)."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(**tiny_unet_config(in_channels)).eval()


def tiny_scheduler(kind: str = "ddim"):
    """SD-1.5-style noise schedule (scaled_linear 0.00085..0.012) as a DDIM or PNDM scheduler."""
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                  steps_offset=1)
    if kind == "pndm":
        return PNDMScheduler(skip_prk_steps=True, **common)
    return DDIMScheduler(clip_sample=False, **common)


def tiny_inpaint_pipeline(seed: int = 0):
    """``StableDiffusionInpaintPipeline`` of tiny parts (9-channel UNet), no safety checker."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed), tokenizer=tiny_tokenizer(),
        unet=tiny_unet(in_channels=9, seed=seed), scheduler=tiny_scheduler("pndm"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_vision(seed: int = 0):
    """``(CLIPVisionModelWithProjection, CLIPImageProcessor)``: 32 px input, 32-d ``image_embeds``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    _seeded(seed)
    cfg = CLIPVisionConfig(
        hidden_size=32, image_size=32, patch_size=8, projection_dim=TINY_IMAGE_EMBED_DIM, intermediate_size=37,
        num_attention_heads=4, num_channels=3, num_hidden_layers=2,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(cfg).eval(), processor


def tiny_dpt(seed: int = 0):
    """``(DPTForDepthEstimation, DPTImageProcessor)``: a 2-layer ViT DPT at 32 px."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    _seeded(seed)
    cfg = DPTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=4,
        backbone_out_indices=[0, 1, 2, 3], num_attention_heads=4, intermediate_size=37,
        neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, is_hybrid=False, head_in_index=-1,
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, ensure_multiple_of=8)
    return DPTForDepthEstimation(cfg).eval(), processor


def tiny_sam(seed: int = 0):
    """segment-anything ``Sam`` at 64 px input (ViT depth 1, width 32); works with ``SamPredictor``."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    _seeded(seed)
    img_size, patch, dim = 64, 16, 32
    grid = img_size // patch
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=patch, in_chans=3, embed_dim=dim, depth=1, num_heads=2, mlp_ratio=2.0,
        out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=0, global_attn_indexes=(0,),
    )
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size),
                           mask_in_chans=4)
    decoder = MaskDecoder(
        num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
        transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()


def synthetic_photo(seed: int, h: int = 96, w: int = 120) -> np.ndarray:
    """A seeded textured test photo ``(h, w, 3)`` uint8: gradient + noise background and one bright disc (the object).

    Used by tests and benchmarks so that stages see image-like statistics without shipping data.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 60 + 10 * (seed % 10))], -1).astype(np.float64)
    img += rng.normal(0, 12, img.shape)
    cy, cx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65)
    obj = (yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) * rng.uniform(0.2, 0.3)) ** 2
    img[obj] = rng.uniform(150, 255, 3) + rng.normal(0, 8, (int(obj.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)

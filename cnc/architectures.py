"""The published architectures of the real models, with random weights (no download).

One definition of each real-size model the project runs, built from its published config: the GPU benchmarks save
them once and load them through the production ``from_pretrained`` paths, the training benchmark trains them, and
:mod:`triplets.flops` counts their FLOPs on the meta device (``with torch.device("meta"): sd_inpaint_unet()`` builds
one without allocating its weights). Every builder takes no weights and returns the module in fp32 on the current
default device.

| builder | published model | parameters |
|---|---|---|
| :func:`sd_unet` | stable-diffusion-v1-5 ``unet`` (4 input channels) | 860 M |
| :func:`sd_inpaint_unet` | stable-diffusion-inpainting ``unet`` (9 input channels) | 860 M |
| :func:`sd_vae` | SD ``vae`` (AutoencoderKL, 4 latent channels, scale factor 8) | 84 M |
| :func:`clip_text` | CLIP ViT-L/14 text tower (SD 1.x ``text_encoder``) | 123 M |
| :func:`clip_vision` | ``openai/clip-vit-large-patch14`` vision tower + projection (224 px) | 304 M |
| :func:`dpt_large` | ``Intel/dpt-large`` (ViT-L/16 at 384 px) | 343 M |
| :func:`sam_vit_h` | segment-anything ViT-H (1024 px) | 641 M |
"""

from __future__ import annotations

#: SD 1.x UNet (``unet/config.json`` of stable-diffusion-v1-5 and of stable-diffusion-inpainting but ``in_channels``).
SD_UNET = dict(
    sample_size=64, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
#: SD ``vae/config.json``.
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)
#: CLIP ViT-L/14 text tower (SD 1.x ``text_encoder/config.json``).
CLIP_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
#: ``openai/clip-vit-large-patch14`` vision tower.
CLIP_VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                   image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
#: ``Intel/dpt-large`` (ViT-L/16 backbone).
DPT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 image_size=384, patch_size=16, backbone_out_indices=[5, 11, 17, 23],
                 neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256, qkv_bias=True)
#: ``Intel/dpt-large`` ``preprocessor_config.json`` (384², mean = std = 0.5).
DPT_LARGE_PROCESSOR = dict(size={"height": 384, "width": 384}, keep_aspect_ratio=False, ensure_multiple_of=1,
                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
#: ``openai/clip-vit-large-patch14`` ``preprocessor_config.json`` (shortest edge 224, centre crop 224).
CLIP_VISION_PROCESSOR = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def sd_unet(in_channels: int = 4):
    """SD 1.5 ``UNet2DConditionModel`` (``in_channels=9``: the inpainting UNet)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(in_channels=in_channels, **SD_UNET)


def sd_inpaint_unet():
    """The stable-diffusion-inpainting UNet (9 input channels: latents, mask, masked-image latents)."""
    return sd_unet(9)


def sd_vae():
    """SD ``AutoencoderKL``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD_VAE)


def clip_text():
    """SD 1.x text encoder (CLIP ViT-L/14 text tower)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**CLIP_TEXT))


def clip_vision():
    """``CLIPVisionModelWithProjection`` of ViT-L/14 (768-d ``image_embeds``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION))


def clip_vision_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**CLIP_VISION_PROCESSOR)


def dpt_large():
    """``DPTForDepthEstimation`` of DPT-Large."""
    from transformers import DPTConfig, DPTForDepthEstimation

    return DPTForDepthEstimation(DPTConfig(**DPT_LARGE))


def dpt_large_processor():
    from transformers import DPTImageProcessor

    return DPTImageProcessor(**DPT_LARGE_PROCESSOR)


def sam_vit_h():
    """segment-anything ``Sam`` ViT-H (image encoder at 1024², prompt encoder, mask decoder)."""
    from segment_anything import build_sam_vit_h

    return build_sam_vit_h(checkpoint=None)


def sd_pndm_scheduler():
    """The PNDM scheduler of the SD 1.x pipelines (``scheduler/scheduler_config.json``)."""
    from cnc.tiny import tiny_scheduler

    return tiny_scheduler("pndm")  # the tiny pipelines use the published schedule itself

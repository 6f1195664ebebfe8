"""Tiny, seeded CnC components for tests and ``MODELS=tiny`` runs (no network).

Built on :mod:`cnc.tiny` (tiny SD parts: 2-level UNet (32, 64), 4-block VAE with scale factor 8, CLIP text width 32,
CLIP vision with 32-d ``image_embeds``). Images of 64-128 px give 8-16 px latents; two DDIM steps take well under a
second on CPU.
"""

from __future__ import annotations

import torch

from cnc import tiny


def tiny_local_fuser(unet=None, seed: int = 0):
    """``LocalFuser.from_unet`` of the tiny UNet (inject channels (16, 24)); zero convs stay zero."""
    from cnc_model.models.local_fuser import LocalFuser

    unet = unet if unet is not None else tiny.tiny_unet(seed=seed)
    torch.manual_seed(seed)
    return LocalFuser.from_unet(unet).eval()


def tiny_global_fuser(seed: int = 0):
    """``GlobalFuser`` 32-d embeddings -> 2 x 4 tokens of width 32."""
    from cnc_model.models.global_fuser import GlobalFuser

    torch.manual_seed(seed)
    return GlobalFuser(image_embed_dim=tiny.TINY_IMAGE_EMBED_DIM, cross_attention_dim=tiny.TINY_CROSS_ATTENTION_DIM,
                       tokens_per_reference=4).eval()


def tiny_cnc_components(seed: int = 0, with_image_encoder: bool = True) -> dict:
    """Keyword arguments of :class:`~cnc_model.pipeline_cnc.CnCPipeline` made of tiny seeded models."""
    unet = tiny.tiny_unet(seed=seed)
    components = dict(
        vae=tiny.tiny_vae(seed), text_encoder=tiny.tiny_text_encoder(seed), tokenizer=tiny.tiny_tokenizer(),
        unet=unet, local_fuser=tiny_local_fuser(unet, seed), global_fuser=tiny_global_fuser(seed),
        scheduler=tiny.tiny_scheduler("ddim"), image_encoder=None, feature_extractor=None,
    )
    if with_image_encoder:
        components["image_encoder"], components["feature_extractor"] = tiny.tiny_clip_vision(seed)
    return components


def tiny_cnc_pipeline(seed: int = 0, with_image_encoder: bool = True):
    """A :class:`~cnc_model.pipeline_cnc.CnCPipeline` of tiny parts, progress bar off."""
    from cnc_model.pipeline_cnc import CnCPipeline

    pipe = CnCPipeline(**tiny_cnc_components(seed, with_image_encoder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize_zero_convs(local_fuser, seed: int = 0, std: float = 0.05) -> None:
    """Re-initialise the zero convs (outputs and depth extractor) so conditioning visibly changes outputs in tests."""
    gen = torch.Generator().manual_seed(seed)
    convs = [*local_fuser.controlnet_down_blocks, local_fuser.controlnet_mid_block,
             *local_fuser.depth_extractor.zero_convs]
    with torch.no_grad():
        for conv in convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
            conv.bias.fill_(0.1)

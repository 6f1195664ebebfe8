"""``CnCPipeline``: Stable Diffusion + CnC local fuser (two depth maps) + global fuser (two CLIP references) with
soft guidance. Defaults follow the reference's inference (DDIM 50 steps, CFG 7.5) at 512 px.

Example::

    pipe = CnCPipeline.from_pretrained("out/cnc")          # a folder written by save_pretrained / convert-reference
    image = pipe("a cat on a sofa", fg_depth=fg, bg_depth=bg, mask=m,
                 fg_reference=fg_photo, bg_reference=bg_photo).images[0]
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from cnc.logs import progress_bars_enabled
from cnc_model.attention import SoftGuidanceMask, has_soft_guidance, install_soft_guidance
from cnc_model.denoiser import CnCDenoiser
from cnc_model.inputs import depth_to_rgb, mask_from_depth, to_embedding, to_map_tensor

# The component classes are imported here on purpose: ``model_index.json`` records them by their defining module
# (``cnc_model.models.local_fuser``...), and diffusers (>= 0.42) resolves such names only from ``sys.modules``.
# Importing
# them with the pipeline makes ``CnCPipeline.from_pretrained(dir)`` work in a fresh interpreter.
from cnc_model.models.global_fuser import GlobalFuser  # noqa: F401
from cnc_model.models.local_fuser import LocalFuser  # noqa: F401

logger = logging.getLogger(__name__)

#: The reference demo's negative prompt; ``cnc sample`` / ``cnc eval`` default to it.
REFERENCE_NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
                             "cropped, worst quality, low quality")
#: The reference demo's positive prompt suffix, appended to every prompt by ``cnc sample`` / ``eval``.
REFERENCE_PROMPT_SUFFIX = ", masterpiece, ultra detailed, high resolution"


@dataclass
class CnCPipelineOutput(BaseOutput):
    """Args:
        images: PIL images, or a ``(B, H, W, 3)`` array in [0, 1] (``output_type="np"``), or a tensor (``"pt"``).
        masks: the soft-guidance mask used, ``(B, 1, H, W)`` float in {0, 1} / [0, 1], or ``None`` (guidance off).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: torch.Tensor | None = None


class CnCPipeline(DiffusionPipeline):
    """Compose-and-Conquer sampling on diffusers.

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (frozen SD UNet), ``local_fuser``
    (:class:`~cnc_model.models.local_fuser.LocalFuser`), ``global_fuser``
    (:class:`~cnc_model.models.global_fuser.GlobalFuser`), ``scheduler``; optional ``image_encoder``
    (``CLIPVisionModelWithProjection``) and ``feature_extractor`` (``CLIPImageProcessor``) to embed PIL references.
    The constructor installs :class:`~cnc_model.attention.SoftGuidanceAttnProcessor` on every attention layer of
    ``unet`` and ``local_fuser`` (in place).

    Either fuser may be ``None``, to sample what one training stage learned: without ``local_fuser`` no depth
    residuals are added (the same output as a fresh, zero-initialised local fuser); without ``global_fuser`` the
    context is the 77 text tokens only and references, scales and the mask are ignored.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->local_fuser->unet->vae"
    _optional_components = ["image_encoder", "feature_extractor", "local_fuser", "global_fuser"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, vae, text_encoder, tokenizer, unet, local_fuser, global_fuser, scheduler,
                 image_encoder=None, feature_extractor=None) -> None:
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, local_fuser=local_fuser,
            global_fuser=global_fuser, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.soft_guidance_resize = "reference"
        self.attention_fp32_logits = False
        self._install_soft_guidance()

    # ----------------------------------------------------------------------------------------------- setup helpers
    @property
    def num_text_tokens(self) -> int:
        """Text context length (the tokenizer's ``model_max_length``, 77 for CLIP)."""
        return int(self.tokenizer.model_max_length)

    def _attention_models(self) -> list:
        return [m for m in (self.unet, self.local_fuser) if m is not None]

    def _install_soft_guidance(self) -> None:
        tokens = self.global_fuser.config.tokens_per_reference if self.global_fuser is not None else 0
        install_soft_guidance(*self._attention_models(), num_text_tokens=self.num_text_tokens,
                              tokens_per_reference=tokens, resize_mode=self.soft_guidance_resize,
                              fp32_logits=self.attention_fp32_logits)

    def set_attention(self, resize_mode: str | None = None, fp32_logits: bool | None = None) -> None:
        """Re-install the soft-guidance processors with ``resize_mode`` (``reference`` | ``nearest`` | ``area``, the
        training config's ``model.soft_guidance_resize``) and/or ``fp32_logits`` (fp32 attention logits and softmax
        in fp16/bf16 models, ``model.attention_fp32_logits``); ``None`` keeps the current value.
        :func:`cnc_model.loading.load_pipeline` sets both from the run's config."""
        if resize_mode is not None:
            self.soft_guidance_resize = resize_mode
        if fp32_logits is not None:
            self.attention_fp32_logits = bool(fp32_logits)
        self._install_soft_guidance()

    def set_unet(self, unet) -> None:
        """Replace the frozen UNet (e.g. by the one a reference checkpoint holds, ``cnc convert-reference
        --save-unet``) and install the soft-guidance processors on it."""
        self.register_modules(unet=unet)
        self._install_soft_guidance()

    def _ensure_soft_guidance(self) -> None:
        if not all(has_soft_guidance(m) for m in self._attention_models()):
            logger.warning("attention processors were replaced (xformers / set_default_attn_processor?); "
                           "re-installing the soft-guidance processors")
            self._install_soft_guidance()

    # ------------------------------------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], device: torch.device) -> torch.Tensor:
        """Prompts -> CLIP last hidden states ``(B, 77, D)`` (padded to ``model_max_length``, truncated)."""
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.num_text_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids)[0].to(dtype=self.unet.dtype)

    @torch.no_grad()
    def encode_reference(self, reference, batch: int, device: torch.device) -> torch.Tensor:
        """A reference -> CLIP ``image_embeds`` ``(batch, E)`` (not L2-normalised).

        ``reference``: ``None`` (zero embedding, = a dropped reference in training), a precomputed embedding
        (``(E,)``/``(B, E)`` tensor or float array), or PIL image(s) / uint8 ``(H, W, 3)`` array(s) (needs the
        ``image_encoder`` and ``feature_extractor`` components).
        """
        dim = self.global_fuser.config.image_embed_dim
        emb = to_embedding(reference, batch, dim)
        if emb is None:
            if self.image_encoder is None or self.feature_extractor is None:
                raise ValueError("image references need the image_encoder and feature_extractor components; load them "
                                 "(CnCPipeline.from_pretrained(..., image_encoder=..., feature_extractor=...)) or pass "
                                 "precomputed CLIP image embeddings")
            images = reference if isinstance(reference, (list, tuple)) else [reference]
            images = [PIL.Image.fromarray(i) if isinstance(i, np.ndarray) else i.convert("RGB") for i in images]
            pixels = self.feature_extractor(images=images, return_tensors="pt").pixel_values
            emb = self.image_encoder(pixels.to(device=device, dtype=self.image_encoder.dtype)).image_embeds
            if emb.shape[0] not in (1, batch):
                raise ValueError(f"{emb.shape[0]} reference images for a batch of {batch}")
            emb = emb.expand(batch, -1)
        return emb.to(device=device, dtype=self.global_fuser.dtype)

    # ------------------------------------------------------------------------------------------------ inputs
    def check_inputs(self, prompt, height: int, width: int, num_inference_steps: int, guidance_scale: float) -> None:
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")

    def prepare_conditions(self, fg_depth, bg_depth, mask, batch: int, height: int, width: int, device):
        """Depths -> ``(B, C, H, W)`` in [0, 1] (zeros when missing); mask -> ``(B, 1, H, W)`` or ``None``.

        A missing mask is derived from the fg depth (:func:`~cnc_model.inputs.mask_from_depth`: min-max, > 0.5); with
        neither mask nor fg depth, soft guidance is off (plain attention over all 85 tokens).
        """
        if self.local_fuser is None:  # depths unused; the mask may still be derived from the fg depth
            channels, dtype = 3, self.unet.dtype
        else:
            channels, dtype = self.local_fuser.config.conditioning_channels, self.local_fuser.dtype
        maps = {}
        for name, value in (("fg_depth", fg_depth), ("bg_depth", bg_depth)):
            maps[name] = (torch.zeros(batch, 1, height, width) if value is None
                          else to_map_tensor(value, batch, height, width, name))
        if mask is not None:
            mask = to_map_tensor(mask, batch, height, width, "mask")
        elif fg_depth is not None:
            mask = mask_from_depth(maps["fg_depth"])
        fg = depth_to_rgb(maps["fg_depth"], channels).to(device=device, dtype=dtype)
        bg = depth_to_rgb(maps["bg_depth"], channels).to(device=device, dtype=dtype)
        return fg, bg, (None if mask is None else mask.to(device))

    def prepare_latents(self, batch: int, height: int, width: int, generator, latents, device) -> torch.Tensor:
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device) * self.scheduler.init_noise_sigma

    # ------------------------------------------------------------------------------------------------ denoising
    @property
    def denoiser(self) -> CnCDenoiser:
        """The shared training/sampling forward (:class:`~cnc_model.denoiser.CnCDenoiser`) of this pipeline."""
        return CnCDenoiser(self.unet, self.local_fuser, self.global_fuser)

    def predict_noise(self, latents, t, context, fg_depth, bg_depth, soft_mask, local_scale: float) -> torch.Tensor:
        """One UNet + local fuser evaluation; all tensors already batched (CFG branches concatenated)."""
        return self.denoiser.predict_noise(latents, t, context, fg_depth, bg_depth, soft_mask, local_scale)

    def progress_bar(self, iterable=None, total=None):
        """diffusers' denoising bar, off where :func:`cnc.logs.progress_bars_enabled` says no (job logs) unless
        ``set_progress_bar_config(disable=...)`` decided."""
        saved = getattr(self, "_progress_bar_config", None)
        if progress_bars_enabled() or "disable" in (saved or {}):
            return super().progress_bar(iterable, total)
        self._progress_bar_config = {**(saved or {}), "disable": True}
        try:
            return super().progress_bar(iterable, total)
        finally:
            self._progress_bar_config = saved if saved is not None else {}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        fg_depth: Any = None,
        bg_depth: Any = None,
        mask: Any = None,
        fg_reference: Any = None,
        bg_reference: Any = None,
        fg_scale: float = 1.0,
        bg_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int = 512,
        width: int = 512,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        local_scale: float = 1.0,
        fg_depth_scale: float = 1.0,
        bg_depth_scale: float = 1.0,
        prompt_suffix: str = "",
        attention_fp32_logits: bool | None = None,
    ) -> CnCPipelineOutput | tuple:
        """Generate images.

        Args:
            prompt: text prompt(s); B = number of prompts.
            fg_depth, bg_depth: ``(H, W)`` or ``(B, 1, H, W)`` arrays/tensors in [0, 1] (uint8 is divided by 255) or
                PIL images; resized to ``height x width``, repeated to 3 channels. ``None`` -> zeros.
            mask: foreground mask ``(H, W)`` / ``(B, 1, H, W)`` in [0, 1]; ``None`` -> derived from ``fg_depth``
                (min-max, > 0.5); with no fg depth either, soft guidance is off.
            fg_reference, bg_reference: PIL image(s) or precomputed CLIP image embeddings; ``None`` -> zeros.
            fg_scale, bg_scale: lambda multiplying the fg / bg tokens (0-2), applied in both CFG branches.
            negative_prompt: text of the unconditional branch (default ""); only the text differs between branches.
            num_inference_steps, guidance_scale, eta: sampler settings (CFG off when ``guidance_scale <= 1``).
            generator, latents: randomness control.
            height, width: output size, multiples of the VAE factor (8).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            local_scale: multiplies the local fuser residuals (1.0).
            fg_depth_scale, bg_depth_scale: per-map depth strength (reference demo sliders 0-2): each depth map is
                multiplied by its factor and clamped to [0, 1] (after the mask is derived).
            prompt_suffix: appended to every prompt (not to the negative prompt); the reference demo uses
                :data:`REFERENCE_PROMPT_SUFFIX`.
            attention_fp32_logits: for this call, compute attention logits and softmax in fp32 when the pipeline
                runs in fp16/bf16 (the reference's ``_ATTN_PRECISION = "fp32"``; a no-op in fp32); ``None`` = the
                pipeline's setting (:meth:`set_attention`; a run's ``model.attention_fp32_logits``).
        """
        # 1. inputs
        self.check_inputs(prompt, height, width, num_inference_steps, guidance_scale)
        if attention_fp32_logits is not None and bool(attention_fp32_logits) != self.attention_fp32_logits:
            kept = self.attention_fp32_logits
            self.set_attention(fp32_logits=attention_fp32_logits)
            try:
                return self.__call__(
                    prompt, fg_depth, bg_depth, mask, fg_reference, bg_reference, fg_scale, bg_scale, negative_prompt,
                    num_inference_steps, guidance_scale, generator, height, width, output_type, return_dict, latents,
                    eta, local_scale, fg_depth_scale, bg_depth_scale, prompt_suffix)
            finally:
                self.set_attention(fp32_logits=kept)
        self._ensure_soft_guidance()
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        do_cfg = guidance_scale > 1.0
        fg_d, bg_d, mask_t = self.prepare_conditions(fg_depth, bg_depth, mask, batch, height, width, device)
        fg_d, bg_d = (fg_d * fg_depth_scale).clamp(0, 1), (bg_d * bg_depth_scale).clamp(0, 1)

        # 2. context = [text (77), lambda_fg * fg tokens (N), lambda_bg * bg tokens (N)] (text only without a
        #    global fuser: no reference tokens, so no soft guidance either -- the denoiser's rule)
        denoiser = self.denoiser
        if prompt_suffix:
            prompts = [p + prompt_suffix for p in prompts]
        fg_emb = bg_emb = None
        if self.global_fuser is not None:
            fg_emb = self.encode_reference(fg_reference, batch, device)
            bg_emb = self.encode_reference(bg_reference, batch, device)
        else:
            mask_t = None
        context = denoiser.build_context(self.encode_prompt(prompts, device), fg_emb, bg_emb, fg_scale, bg_scale)
        if do_cfg:  # batched CFG: [uncond, cond]; same tokens, depths and mask in both branches
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * batch if isinstance(negative, str) else list(negative)
            if len(negative) != batch:
                raise ValueError(f"{len(negative)} negative prompts for {batch} prompts")
            uncond = denoiser.build_context(self.encode_prompt(negative, device), fg_emb, bg_emb, fg_scale, bg_scale)
            context = torch.cat([uncond, context])
            fg_d, bg_d = torch.cat([fg_d, fg_d]), torch.cat([bg_d, bg_d])
        soft_mask = None if mask_t is None else SoftGuidanceMask(mask_t)  # tiled over CFG branches by the processor

        # 3. denoising loop
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch, height, width, generator, latents, device)
        params = inspect.signature(self.scheduler.step).parameters
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents, latents]) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise = denoiser.predict_noise(model_in, t, context, fg_d, bg_d, soft_mask, local_scale)
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]

        # 4. decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, mask_t
        return CnCPipelineOutput(images=images, masks=mask_t)

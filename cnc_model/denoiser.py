"""One CnC denoiser for training and sampling: context building and noise prediction, written once.

Both :class:`~cnc_model.training.trainer.Trainer` and :class:`~cnc_model.pipeline_cnc.CnCPipeline` call
:class:`CnCDenoiser`, so the rules below hold on both paths:

- **context** = ``[text (77), λ_fg · fg tokens (N), λ_bg · bg tokens (N)]`` when a global fuser is present, else the
  77 text tokens only (stage ``local``);
- **soft guidance is on exactly when a global fuser is present and a mask is given** (stage ``global`` and
  ``joint`` in training; a pipeline with a global fuser and a mask in sampling);
- **noise prediction** = frozen UNet (encoder + middle optionally under ``no_grad``, as the reference) + the local
  fuser's
  12 + 1 residuals (none without a local fuser), the same soft-guidance mask in the UNet and in the local fuser.

The fusers may be accelerate/DDP-wrapped modules (the trainer passes its prepared ones); the denoiser only calls them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnc_model.attention import SoftGuidanceMask
from cnc_model.models.frozen_unet import run_frozen_unet

#: Values of ``scheduler.config.prediction_type`` the trainer can build a target for.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target of the noise scheduler's ``prediction_type`` (``epsilon``: the noise itself).

    Raises:
        ValueError: for any other prediction type (never silently treated as epsilon).
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} of the noise scheduler; expected one of {PREDICTION_TYPES}")


class CnCDenoiser:
    """Frozen UNet + optional local fuser + optional global fuser as one noise-prediction function.

    Args:
        unet: the frozen SD ``UNet2DConditionModel`` (soft-guidance processors installed).
        local_fuser: :class:`~cnc_model.models.local_fuser.LocalFuser` (possibly wrapped) or ``None``.
        global_fuser: :class:`~cnc_model.models.global_fuser.GlobalFuser` (possibly wrapped) or ``None``.
        frozen_encoder_no_grad: run the UNet's time embedding, encoder and middle block under ``no_grad``
            (reference; only matters when gradients are on).
    """

    def __init__(self, unet: nn.Module, local_fuser: nn.Module | None = None, global_fuser: nn.Module | None = None,
                 frozen_encoder_no_grad: bool = True) -> None:
        self.unet = unet
        self.local_fuser = local_fuser
        self.global_fuser = global_fuser
        self.frozen_encoder_no_grad = frozen_encoder_no_grad

    @property
    def soft_guidance(self) -> bool:
        """Whether a mask is applied when given: only with reference tokens, i.e. with a global fuser."""
        return self.global_fuser is not None

    def build_context(self, text_states: torch.Tensor, fg_emb: torch.Tensor | None = None,
                      bg_emb: torch.Tensor | None = None, fg_scale: float | torch.Tensor = 1.0,
                      bg_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Text states ``(B, 77, D)`` (+ CLIP embeddings ``(B, E)``) -> context ``(B, 77 [+ 2N], D)``.

        Without a global fuser the embeddings and scales are ignored. A missing embedding is a zero vector (= the
        training dropout of a reference). ``fg_scale``/``bg_scale`` (λ, 0-2) multiply the token embeddings.
        """
        if self.global_fuser is None:
            return text_states
        batch, device = text_states.shape[0], text_states.device
        dtype = _param_dtype(self.global_fuser)
        embs = []
        for emb in (fg_emb, bg_emb):
            if emb is None:
                raise ValueError("the global fuser needs fg and bg embeddings (use zeros for a missing reference)")
            embs.append(emb.to(device=device, dtype=dtype).expand(batch, -1))
        tokens = self.global_fuser(embs[0], embs[1], fg_scale, bg_scale)  # (B, 2N, D)
        return torch.cat([text_states, tokens.to(text_states.dtype)], dim=1)

    def attention_kwargs(self, mask: torch.Tensor | SoftGuidanceMask | None) -> dict[str, Any] | None:
        """``cross_attention_kwargs`` for the UNet and the local fuser (``None`` when soft guidance is off)."""
        if mask is None or not self.soft_guidance:
            return None
        return {"soft_guidance_mask": mask if isinstance(mask, SoftGuidanceMask) else SoftGuidanceMask(mask)}

    def predict_noise(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, context: torch.Tensor,
                      fg_depth: torch.Tensor | None = None, bg_depth: torch.Tensor | None = None,
                      mask: torch.Tensor | SoftGuidanceMask | None = None,
                      local_scale: float = 1.0) -> torch.Tensor:
        """The model output ``(B, 4, h, w)`` for noisy latents ``sample`` ``(B, 4, h, w)``.

        Args:
            timestep: scalar or ``(B,)``.
            context: from :meth:`build_context`, ``(B, K, D)``.
            fg_depth, bg_depth: ``(B, C, H, W)`` in [0, 1] at image size (needed with a local fuser).
            mask: ``(B', 1, H, W)`` in [0, 1] (``B`` a multiple of ``B'``: CFG branches share it) or a
                :class:`~cnc_model.attention.SoftGuidanceMask`; used only when :attr:`soft_guidance`.
            local_scale: multiplies the local fuser residuals.
        """
        kwargs = self.attention_kwargs(mask)
        unet_dtype = _param_dtype(self.unet)
        down = mid = None
        if self.local_fuser is not None:
            if fg_depth is None or bg_depth is None:
                raise ValueError("the local fuser needs fg_depth and bg_depth (use zeros for a missing map)")
            dtype = _param_dtype(self.local_fuser)
            down, mid = self.local_fuser(sample.to(dtype), timestep, context.to(dtype), fg_depth.to(dtype),
                                         bg_depth.to(dtype), conditioning_scale=local_scale,
                                         cross_attention_kwargs=kwargs, return_dict=False)
            down, mid = [d.to(unet_dtype) for d in down], mid.to(unet_dtype)
        return run_frozen_unet(self.unet, sample.to(unet_dtype), timestep, context.to(unet_dtype), down, mid,
                               cross_attention_kwargs=kwargs, frozen_encoder_no_grad=self.frozen_encoder_no_grad)

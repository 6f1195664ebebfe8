"""CnC global fuser: two gated MLPs mapping CLIP image embeddings to cross-attention tokens.

Per branch (fg, bg), as the reference ``GlobalFuser(in_dim=768, channel_mult=[2, 4])``:
LayerNorm(E) -> GEGLU FeedForward E -> 2E (inner 4E, dropout 0.1) -> LayerNorm(2E) -> GEGLU FeedForward 2E -> N*D
(inner 8E, dropout 0.3) -> reshape to N tokens of width D. Attribute names (``norm1_fg``, ``ff1_fg``, ``norm2_fg``,
``ff2_fg`` and ``_bg``) let the released ``global_adapter.*`` keys load unchanged.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _as_scale(scale: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor | float:
    """A float, or a per-sample ``(B,)`` tensor broadcast over tokens and channels."""
    if torch.is_tensor(scale):
        return scale.to(device=ref.device, dtype=ref.dtype).reshape(-1, 1, 1)
    return float(scale)


class GlobalFuser(ModelMixin, ConfigMixin):
    """fg/bg CLIP image embeddings -> ``2 * tokens_per_reference`` context tokens ``[fg..., bg...]``.

    Args (config):
        image_embed_dim: CLIP ``image_embeds`` width E (768 for CLIP ViT-L/14).
        cross_attention_dim: token width D (the UNet's ``cross_attention_dim``, 768 for SD 1.5).
        tokens_per_reference: N tokens per reference image (4).
        hidden_mult: width of the middle layer as a multiple of E (2, the reference ``channel_mult[0]``).
        dropout1, dropout2: dropout inside the two FeedForwards (0.1, 0.3 as the reference).

    Not zero-initialised (as the reference): a zero embedding still gives non-zero "null" tokens (LayerNorm bias).
    """

    @register_to_config
    def __init__(
        self,
        image_embed_dim: int = 768,
        cross_attention_dim: int = 768,
        tokens_per_reference: int = 4,
        hidden_mult: int = 2,
        dropout1: float = 0.1,
        dropout2: float = 0.3,
    ) -> None:
        super().__init__()
        hidden = image_embed_dim * hidden_mult
        out = tokens_per_reference * cross_attention_dim
        for branch in ("fg", "bg"):
            setattr(self, f"norm1_{branch}", nn.LayerNorm(image_embed_dim))
            setattr(self, f"ff1_{branch}", FeedForward(image_embed_dim, dim_out=hidden, mult=4, dropout=dropout1,
                                                       activation_fn="geglu"))
            setattr(self, f"norm2_{branch}", nn.LayerNorm(hidden))
            setattr(self, f"ff2_{branch}", FeedForward(hidden, dim_out=out, mult=4, dropout=dropout2,
                                                       activation_fn="geglu"))

    def _branch(self, emb: torch.Tensor, branch: str) -> torch.Tensor:
        x = getattr(self, f"ff1_{branch}")(getattr(self, f"norm1_{branch}")(emb))
        x = getattr(self, f"ff2_{branch}")(getattr(self, f"norm2_{branch}")(x))
        return x.reshape(emb.shape[0], self.config.tokens_per_reference, self.config.cross_attention_dim)

    def forward(
        self,
        fg_emb: torch.Tensor,
        bg_emb: torch.Tensor,
        fg_scale: float | torch.Tensor = 1.0,
        bg_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """``fg_emb``, ``bg_emb`` ``(B, E)`` (not L2-normalised) -> tokens ``(B, 2N, D)``, fg first.

        ``fg_scale``/``bg_scale`` (lambda, floats or ``(B,)`` tensors, 0-2 in the demo) multiply the tokens, i.e. both
        keys and values downstream; lambda = 0 leaves zero tokens that still take softmax mass.
        """
        dtype = self.norm1_fg.weight.dtype
        fg = self._branch(fg_emb.to(dtype), "fg")
        bg = self._branch(bg_emb.to(dtype), "bg")
        return torch.cat([fg * _as_scale(fg_scale, fg), bg * _as_scale(bg_scale, bg)], dim=1)

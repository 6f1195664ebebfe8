"""Feature denormalisation (FDN, SPADE-style) and the FDN variant of diffusers' ResNet block.

The reference (Uni-ControlNet / CnC ``LocalResBlock``) replaces both GroupNorms of the first ResNet block of each
encoder level with a parameter-free GroupNorm modulated by 3x3 convolutions of the injected depth features:
``out = norm(x) * (1 + conv_gamma(feat)) + conv_beta(feat)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


class FDN(nn.Module):
    """Parameter-free GroupNorm denormalised by a spatial feature map.

    Args:
        channels: channels ``C`` of the normalised activation ``x``.
        feat_channels: channels of the conditioning feature map.
        groups: GroupNorm groups (the UNet's ``norm_num_groups``; 32 for SD).
        eps: GroupNorm epsilon.
    """

    def __init__(self, channels: int, feat_channels: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        self.param_free_norm = nn.GroupNorm(groups, channels, eps=eps, affine=False)
        self.conv_gamma = nn.Conv2d(feat_channels, channels, kernel_size=3, padding=1)
        self.conv_beta = nn.Conv2d(feat_channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, h, w)``, ``feat`` ``(B, F, h', w')`` -> ``(B, C, h, w)``.

        ``feat`` is resized (nearest) to ``(h, w)`` when the sizes differ (odd latents, other VAE factors);
        the reference asserts equal sizes instead.
        """
        if feat.shape[-2:] != x.shape[-2:]:
            feat = F.interpolate(feat, size=x.shape[-2:], mode="nearest")
        feat = feat.to(x.dtype)
        return self.param_free_norm(x) * (1 + self.conv_gamma(feat)) + self.conv_beta(feat)


class FDNResnetBlock2D(ResnetBlock2D):
    """``ResnetBlock2D`` whose ``norm1``/``norm2`` are :class:`FDN` (the reference ``LocalResBlock``).

    Parameter names stay those of ``ResnetBlock2D`` (``conv1``, ``time_emb_proj``, ``conv2``, ``conv_shortcut``) so an
    SD ResNet state dict loads with ``strict=False``: the missing keys are exactly the FDN ``conv_gamma``/``conv_beta``
    and the unexpected keys exactly the dropped GroupNorm affines.

    Args:
        feat_channels: channels of the injected feature map.
        **resnet_kwargs: keyword arguments of ``ResnetBlock2D`` (no ``up``/``down``).
    """

    def __init__(self, *, feat_channels: int, **resnet_kwargs) -> None:
        super().__init__(**resnet_kwargs)
        if self.upsample is not None or self.downsample is not None:
            raise ValueError("FDNResnetBlock2D does not support up/down sampling ResNet blocks")
        self.norm1 = FDN(self.in_channels, feat_channels, self.norm1.num_groups, self.norm1.eps)
        self.norm2 = FDN(self.out_channels, feat_channels, self.norm2.num_groups, self.norm2.eps)

    @classmethod
    def from_resnet(cls, resnet: ResnetBlock2D, feat_channels: int, act_fn: str = "silu") -> FDNResnetBlock2D:
        """Build an FDN block with the hyper-parameters of ``resnet`` (weights are not copied)."""
        return cls(
            feat_channels=feat_channels,
            in_channels=resnet.in_channels,
            out_channels=resnet.out_channels,
            temb_channels=resnet.time_emb_proj.in_features if resnet.time_emb_proj is not None else None,
            dropout=resnet.dropout.p,
            groups=resnet.norm1.num_groups,
            groups_out=resnet.norm2.num_groups,
            eps=resnet.norm1.eps,
            non_linearity=act_fn,
            skip_time_act=resnet.skip_time_act,
            time_embedding_norm=resnet.time_embedding_norm,
            output_scale_factor=resnet.output_scale_factor,
            use_in_shortcut=resnet.use_in_shortcut,
            conv_2d_out_channels=resnet.conv2.out_channels,
        )

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, feat: torch.Tensor) -> torch.Tensor:
        """``input_tensor`` ``(B, C_in, h, w)``, ``temb`` ``(B, T)``, ``feat`` ``(B, F, h, w)`` -> ``(B, C_out, h, w)``.

        Order: FDN_in -> act -> conv1 -> + time embedding -> FDN_out -> act -> dropout -> conv2 -> + skip.
        """
        hidden_states = self.nonlinearity(self.norm1(input_tensor, feat))
        hidden_states = self.conv1(hidden_states)
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        else:
            temb = None
        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states, feat)
        else:  # "scale_shift"
            scale, shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self.norm2(hidden_states, feat) * (1 + scale) + shift
        hidden_states = self.dropout(self.nonlinearity(hidden_states))
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor.contiguous())
        return (input_tensor + hidden_states) / self.output_scale_factor

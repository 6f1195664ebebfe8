"""CnC local fuser: a ControlNet-style trainable copy of the UNet encoder + middle block fed two depth maps.

Differences from diffusers' ``ControlNetModel``: no hint is added after ``conv_in`` (the copy runs on the noisy latent
only); the depth features enter through FDN in the first ResNet of every encoder level (``down_blocks[i].resnets[0]``,
the reference ``input_blocks`` 1, 4, 7, 10). Outputs are the 12 + 1 zero-initialised 1x1 conv residuals in exactly the
form ``UNet2DConditionModel.forward`` takes as ``down_block_additional_residuals`` / ``mid_block_additional_residual``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.utils import BaseOutput
from torch import nn

from cnc_model.models.depth_extractor import DepthFeatureExtractor, default_inject_channels
from cnc_model.models.fdn import FDNResnetBlock2D


@dataclass
class LocalFuserOutput(BaseOutput):
    """Residuals for the frozen UNet.

    Args:
        down_block_res_samples: ``1 + levels * (layers_per_block + 1) - 1`` tensors (12 for SD 1.5), shaped like the
            UNet's skip connections, to pass as ``down_block_additional_residuals``.
        mid_block_res_sample: ``(B, block_out_channels[-1], h/2**(L-1), w/2**(L-1))`` for
            ``mid_block_additional_residual``.
    """

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LocalFuser(ModelMixin, AttentionMixin, ConfigMixin):
    """Trainable encoder copy ``{E', C'}`` of an SD-style UNet with FDN depth injection.

    Build it from a UNet with :meth:`from_unet`. Module names (``conv_in``, ``time_proj``, ``time_embedding``,
    ``down_blocks``, ``mid_block``, ``controlnet_down_blocks``, ``controlnet_mid_block``) are those of diffusers'
    UNet / ControlNet; the depth stems live in ``depth_extractor``.

    Args (config): the encoder part of ``UNet2DConditionModel``'s config, plus
        conditioning_channels: channels of each depth map (3 = depth repeated to RGB, ``local_channels`` of the
            reference, so the released weights fit).
        inject_channels: injected feature channels per level; ``None`` derives them from ``block_out_channels``
            (:func:`default_inject_channels`; SD 1.5 -> (192, 256, 384, 512)).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        inject_channels: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        levels = len(block_out_channels)
        if len(down_block_types) != levels:
            raise ValueError(f"down_block_types {down_block_types} and block_out_channels {block_out_channels} differ")
        inject_channels = tuple(inject_channels or default_inject_channels(block_out_channels))
        if len(inject_channels) != levels:
            raise ValueError(f"inject_channels {inject_channels} needs one entry per level ({levels})")
        self.register_to_config(inject_channels=list(inject_channels))  # record the derived value
        # diffusers' naming quirk: num_attention_heads defaults to attention_head_dim (see ControlNetModel).
        heads = num_attention_heads or attention_head_dim
        heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
        head_dims = (attention_head_dim,) * levels if isinstance(attention_head_dim, int) else tuple(attention_head_dim)
        tlpb = (transformer_layers_per_block,) * levels if isinstance(transformer_layers_per_block, int) else tuple(
            transformer_layers_per_block)

        time_embed_dim = block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)
        self.depth_extractor = DepthFeatureExtractor(conditioning_channels, inject_channels)

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(block_out_channels[0])])
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final = i == levels - 1
            block = get_down_block(
                block_type, num_layers=layers_per_block, transformer_layers_per_block=tlpb[i],
                in_channels=input_channel, out_channels=output_channel, temb_channels=time_embed_dim,
                add_downsample=not is_final, resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim, num_attention_heads=heads[i],
                attention_head_dim=head_dims[i] if head_dims[i] is not None else output_channel,
                downsample_padding=downsample_padding, use_linear_projection=use_linear_projection,
                only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
                resnet_time_scale_shift=resnet_time_scale_shift,
            )
            block.resnets[0] = FDNResnetBlock2D.from_resnet(block.resnets[0], inject_channels[i], act_fn)
            self.down_blocks.append(block)
            for _ in range(layers_per_block + (0 if is_final else 1)):
                self.controlnet_down_blocks.append(_zero_conv(output_channel))

        self.mid_block = UNetMidBlock2DCrossAttn(
            transformer_layers_per_block=tlpb[-1], in_channels=block_out_channels[-1], temb_channels=time_embed_dim,
            resnet_eps=norm_eps, resnet_act_fn=act_fn, output_scale_factor=mid_block_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift, cross_attention_dim=cross_attention_dim,
            num_attention_heads=heads[-1], resnet_groups=norm_num_groups, use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )
        self.controlnet_mid_block = _zero_conv(block_out_channels[-1])
        self.gradient_checkpointing = False

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        conditioning_channels: int = 3,
        inject_channels: tuple[int, ...] | None = None,
        load_weights_from_unet: bool = True,
    ) -> LocalFuser:
        """Copy an SD-style ``UNet2DConditionModel``'s encoder and middle block (ControlNet ``from_unet``).

        The FDN ResNets take the UNet's conv1 / time_emb_proj / conv2 / shortcut weights; their GroupNorm affines are
        dropped and the FDN gamma/beta convs keep their default init. Zero convs and the depth extractor are new.
        """
        cfg = unet.config
        for key in ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim"):
            if cfg.get(key) is not None:
                raise ValueError(f"LocalFuser supports SD-style UNets only; unet.config.{key}={cfg.get(key)!r}")
        if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"unsupported mid_block_type {cfg.mid_block_type!r}")
        fuser = cls(
            in_channels=cfg.in_channels, conditioning_channels=conditioning_channels,
            flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift, down_block_types=cfg.down_block_types,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            downsample_padding=cfg.downsample_padding, mid_block_scale_factor=cfg.mid_block_scale_factor,
            act_fn=cfg.act_fn, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
            cross_attention_dim=cfg.cross_attention_dim,
            transformer_layers_per_block=cfg.get("transformer_layers_per_block", 1),
            attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
            use_linear_projection=cfg.use_linear_projection, only_cross_attention=cfg.only_cross_attention,
            upcast_attention=cfg.upcast_attention, resnet_time_scale_shift=cfg.resnet_time_scale_shift,
            inject_channels=inject_channels,
        )
        if load_weights_from_unet:
            fuser.load_unet_weights(unet)
        return fuser if unet.dtype == fuser.dtype else fuser.to(dtype=unet.dtype)

    def load_unet_weights(self, unet: nn.Module) -> None:
        """Copy ``conv_in``, time embedding, down blocks and middle block from ``unet`` (FDN parts stay as they are)."""
        self.conv_in.load_state_dict(unet.conv_in.state_dict())
        self.time_proj.load_state_dict(unet.time_proj.state_dict())
        self.time_embedding.load_state_dict(unet.time_embedding.state_dict())
        missing, unexpected = self.down_blocks.load_state_dict(unet.down_blocks.state_dict(), strict=False)
        # Expected mismatch: FDN gamma/beta convs are new, the first ResNets' GroupNorm affines are dropped.
        bad = [k for k in missing if ".norm1.conv_" not in k and ".norm2.conv_" not in k]
        bad += [k for k in unexpected if not k.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"))]
        if bad:
            raise ValueError(f"UNet down blocks do not match the local fuser: {bad[:10]}")
        self.mid_block.load_state_dict(unet.mid_block.state_dict())

    def _time_embedding(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        t_emb = self.time_proj(timesteps.expand(sample.shape[0])).to(dtype=sample.dtype)
        return self.time_embedding(t_emb)

    def _run_down_block(self, block: nn.Module, hidden: torch.Tensor, emb: torch.Tensor, feat: torch.Tensor,
                        encoder_hidden_states: torch.Tensor, cross_attention_kwargs: dict | None):
        """One encoder level by hand so that ``resnets[0]`` receives ``feat``; returns ``(hidden, skips)``."""
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        attentions = getattr(block, "attentions", None)
        skips = ()
        for i, resnet in enumerate(block.resnets):
            args = (hidden, emb, feat) if i == 0 else (hidden, emb)
            hidden = self._gradient_checkpointing_func(resnet, *args) if checkpointing else resnet(*args)
            if attentions is not None:
                hidden = attentions[i](
                    hidden, encoder_hidden_states=encoder_hidden_states,
                    cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
                )[0]
            skips += (hidden,)
        if block.downsamplers is not None:
            for downsampler in block.downsamplers:
                hidden = downsampler(hidden)
            skips += (hidden,)
        return hidden, skips

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        fg_depth: torch.Tensor,
        bg_depth: torch.Tensor,
        conditioning_scale: float = 1.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> LocalFuserOutput | tuple:
        """Residuals for the frozen UNet.

        Args:
            sample: noisy latent ``(B, 4, h, w)``.
            timestep: scalar or ``(B,)``.
            encoder_hidden_states: context ``(B, K, cross_attention_dim)`` (77 text + 2N global tokens in CnC mode).
            fg_depth, bg_depth: ``(B, conditioning_channels, H, W)`` in [0, 1], ``H = 8 h`` for SD's VAE.
            conditioning_scale: multiplies every residual (``local_control_scales`` of the reference, 1.0).
            cross_attention_kwargs: forwarded to the attention processors (e.g. ``soft_guidance_mask``).
        """
        emb = self._time_embedding(sample, timestep)
        features = self.depth_extractor(fg_depth.to(sample.dtype), bg_depth.to(sample.dtype))
        hidden = self.conv_in(sample)
        skips = (hidden,)
        for block, feat in zip(self.down_blocks, features):
            hidden, block_skips = self._run_down_block(
                block, hidden, emb, feat, encoder_hidden_states, cross_attention_kwargs)
            skips += block_skips
        hidden = self.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states,
                                cross_attention_kwargs=cross_attention_kwargs)
        down = tuple(conv(s) * conditioning_scale for s, conv in zip(skips, self.controlnet_down_blocks))
        mid = self.controlnet_mid_block(hidden) * conditioning_scale
        if not return_dict:
            return down, mid
        return LocalFuserOutput(down_block_res_samples=down, mid_block_res_sample=mid)

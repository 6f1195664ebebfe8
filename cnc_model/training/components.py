"""Models of a training run: the frozen SD parts and the stage's trainable fusers.

``model.pretrained_model_name_or_path`` is a diffusers SD 1.5 folder / hub id (checked up front with
:func:`cnc.hub.resolve_pretrained`, one-line error naming the model and the config key) or ``tiny`` (the seeded
tiny SD folder written once by :mod:`cnc.tiny_store`, no network); either way it loads with ``from_pretrained``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnc.base.errors import ModelUnavailableError
from cnc.hub import resolve_pretrained
from cnc_model.training.config import TrainConfig

logger = logging.getLogger(__name__)
BASE_KEY = "model.pretrained_model_name_or_path"
UNET_KEY = "model.unet"


@dataclass
class Components:
    """Frozen ``vae``, ``text_encoder``, ``unet``; ``tokenizer``; training ``noise_scheduler``; the trainable
    ``local_fuser`` / ``global_fuser`` of the stage (``None`` when the stage does not train it)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    noise_scheduler: Any
    local_fuser: Any = None
    global_fuser: Any = None
    extra: dict = field(default_factory=dict)

    def trainables(self) -> dict[str, torch.nn.Module]:
        """``{"local_fuser": ..., "global_fuser": ...}`` for the modules that are present, in that order."""
        return {k: m for k, m in (("local_fuser", self.local_fuser), ("global_fuser", self.global_fuser))
                if m is not None}


def resolve_base(cfg: TrainConfig) -> str:
    """Local folder (or uncached hub id) of the base model; ``tiny`` = the seeded tiny SD folder of ``cfg.seed``.

    Raises:
        ModelUnavailableError: one line naming the model and :data:`BASE_KEY`.
    """
    m = cfg.model
    return resolve_pretrained(m.pretrained_model_name_or_path, BASE_KEY, seed=cfg.seed, revision=m.revision)


def _load_base(cfg: TrainConfig) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    m = cfg.model
    path = resolve_base(cfg)
    kw = dict(revision=m.revision) if path == m.pretrained_model_name_or_path else {}
    try:
        parts = dict(
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=m.variant, **kw),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=m.variant, **kw),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        )
        if m.unet is None:
            parts["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=m.variant, **kw)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"model '{m.pretrained_model_name_or_path}' (config key {BASE_KEY}) could not be "
                                    f"loaded as a diffusers Stable Diffusion folder: {exc}".splitlines()[0]) from None
    if m.unet is not None:
        parts["unet"] = load_unet_folder(m.unet, UNET_KEY)
    return parts


def unet_folder(path: str, key: str) -> Path:
    """A saved diffusers UNet folder (``config.json`` + weights), or a folder holding one in ``unet/`` (a pipeline
    or ``cnc convert-reference`` output); one clear line otherwise."""
    p = Path(path).expanduser()
    for candidate in (p, p / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelUnavailableError(f"UNet '{path}' (config key {key}) is not a saved diffusers UNet folder (no "
                                f"config.json in it or in unet/); write one with `cnc convert-reference CKPT -o OUT "
                                f"--base-model SD --save-unet`")


def load_unet_folder(path: str, key: str):
    """``UNet2DConditionModel.from_pretrained`` of :func:`unet_folder`; failures are one line naming ``key``."""
    from diffusers import UNet2DConditionModel

    folder = unet_folder(path, key)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"UNet '{path}' (config key {key}) could not be loaded: "
                                    f"{str(exc).splitlines()[0]}") from None
    logger.info("frozen UNet from %s (%s)", folder, key)
    return unet


def fuser_folder(path: str, name: str, key: str) -> Path:
    """A saved fuser folder, or a run's output folder holding ``name/``; clear error otherwise."""
    p = Path(path).expanduser()
    for candidate in (p, p / name):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelUnavailableError(f"{name} '{path}' (config key {key}) is not a saved {name} folder "
                                f"(no config.json in it or in {name}/)")


def build_local_fuser(cfg: TrainConfig, unet):
    """``model.local_fuser`` if set; else ``model.local_fuser_init``: ``from_unet`` -> ``LocalFuser.from_unet(unet)``
    (fresh depth extractor and zero convs), a path -> the local adapter of a reference checkpoint (``uni.ckpt``)."""
    from cnc_model.models.local_fuser import LocalFuser

    if cfg.model.local_fuser:
        folder = fuser_folder(cfg.model.local_fuser, "local_fuser", "model.local_fuser")
        logger.info("local fuser initialised from %s", folder)
        return LocalFuser.from_pretrained(folder, dtype=torch.float32)
    if cfg.model.local_fuser_init != "from_unet":
        from cnc_model.convert import ConversionError, local_fuser_from_reference

        path = Path(cfg.model.local_fuser_init).expanduser()
        if not path.is_file():
            raise ModelUnavailableError(f"local fuser init checkpoint '{path}' (config key model.local_fuser_init) "
                                        "not found; give the path of uni.ckpt or use 'from_unet'")
        try:
            fuser = local_fuser_from_reference(
                path, unet, conditioning_channels=cfg.data.depth_channels, seed=cfg.seed,
                base_name=f"model.unet {cfg.model.unet}" if cfg.model.unet else
                f"{BASE_KEY} {cfg.model.pretrained_model_name_or_path}")
        except ConversionError as err:
            raise ModelUnavailableError(f"model.local_fuser_init: {err}") from None
        logger.info("local fuser initialised from the reference checkpoint %s", path)
        return fuser.to(torch.float32)
    torch.manual_seed(cfg.seed)
    fuser = LocalFuser.from_unet(unet, conditioning_channels=cfg.data.depth_channels)
    return fuser if fuser.dtype == torch.float32 else fuser.to(torch.float32)


def build_global_fuser(cfg: TrainConfig, image_embed_dim: int, cross_attention_dim: int):
    """``model.global_fuser`` if set, else a random ``GlobalFuser`` (reference init)."""
    from cnc_model.models.global_fuser import GlobalFuser

    if cfg.model.global_fuser:
        folder = fuser_folder(cfg.model.global_fuser, "global_fuser", "model.global_fuser")
        logger.info("global fuser initialised from %s", folder)
        fuser = GlobalFuser.from_pretrained(folder, dtype=torch.float32)
    else:
        torch.manual_seed(cfg.seed + 1)
        fuser = GlobalFuser(image_embed_dim=image_embed_dim, cross_attention_dim=cross_attention_dim,
                            tokens_per_reference=cfg.model.tokens_per_reference)
    if fuser.config.image_embed_dim != image_embed_dim:
        raise ValueError(f"the global fuser takes {fuser.config.image_embed_dim}-d embeddings but the shards hold "
                         f"{image_embed_dim}-d ones")
    return fuser.to(torch.float32)


def load_components(cfg: TrainConfig, image_embed_dim: int) -> Components:
    """Base models + the stage's fusers (all fp32 here; the trainer casts the frozen ones)."""
    base = _load_base(cfg)
    if cfg.stage == "joint" and not (cfg.model.local_fuser and cfg.model.global_fuser):
        logger.warning("stage joint without model.local_fuser and model.global_fuser: the missing fuser starts "
                       "from scratch (the reference initialises both from the local and global runs)")
    local = build_local_fuser(cfg, base["unet"]) if cfg.trains_local else None
    glob = (build_global_fuser(cfg, image_embed_dim, base["unet"].config.cross_attention_dim)
            if cfg.trains_global else None)
    return Components(local_fuser=local, global_fuser=glob, **base)

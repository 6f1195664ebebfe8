"""The seeded tiny models of :mod:`cnc.tiny` as real checkpoints on disk.

A config value ``tiny`` resolves (:func:`cnc.hub.resolve_pretrained`) to a folder or file made here once per
machine, so stages and training components only ever call ``from_pretrained`` or load a file, exactly as with
real weights. Layout, under :func:`cache_root` (``$CNC_CACHE`` or ``~/.cache/cnc``)::

    tiny/<key>/<kind>-seed<seed>/          save_pretrained folder (kinds: inpaint, sd, depth, embed)
    tiny/<key>/sam-seed<seed>/sam_tiny.pth SAM state dict (torch.save, loaded with weights_only=True)
    tiny/<key>/u2net-seed<seed>/u2net_tiny.pth   U²-Net state dict (the tiny widths of triplets.stages.u2net)

``<key>`` hashes the source of :mod:`cnc.tiny` and the versions of torch, diffusers and transformers, so a change of
the tiny architectures or of the libraries never reuses stale weights. Every entry is written into a temporary
sibling folder and renamed into place, so parallel Ray workers never see half a folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

#: Environment variable naming the cnc cache folder (tiny checkpoints, downloaded files, the weight-hash cache).
CACHE_ENV = "CNC_CACHE"
#: The file name of the tiny SAM checkpoint inside its folder.
TINY_SAM_FILE = "sam_tiny.pth"
TINY_U2NET_FILE = "u2net_tiny.pth"
#: Kinds stored as one ``.pth`` file (the others are ``save_pretrained`` folders).
FILE_KINDS = {"sam": TINY_SAM_FILE, "u2net": TINY_U2NET_FILE}
#: ``sam_model_type`` of the tiny SAM architecture (see :func:`tiny_sam_architecture`).
TINY_SAM_TYPE = "tiny"


def cache_root() -> Path:
    """``$CNC_CACHE`` or ``~/.cache/cnc``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cnc").expanduser()


def tiny_key() -> str:
    """16-hex hash of :mod:`cnc.tiny`'s source and of the library versions that shape the saved weights."""
    from cnc import tiny

    h = hashlib.sha256(Path(tiny.__file__).read_bytes())
    for pkg in ("torch", "diffusers", "transformers", "segment-anything"):
        try:
            h.update(f"{pkg}={metadata.version(pkg)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{pkg}=?".encode())
    return h.hexdigest()[:16]


def _save_inpaint(folder: Path, seed: int) -> None:
    from cnc.tiny import tiny_inpaint_pipeline

    tiny_inpaint_pipeline(seed).save_pretrained(folder)


def _save_sd(folder: Path, seed: int) -> None:
    """A diffusers SD folder (unet, vae, text_encoder, tokenizer, scheduler) as the trainer loads it."""
    from diffusers import DDPMScheduler

    from cnc import tiny

    tiny.tiny_vae(seed).save_pretrained(folder / "vae")
    tiny.tiny_text_encoder(seed).save_pretrained(folder / "text_encoder")
    tiny.tiny_tokenizer().save_pretrained(folder / "tokenizer")
    tiny.tiny_unet(seed=seed).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, prediction_type="epsilon").save_pretrained(folder / "scheduler")


def _save_pair(builder: Callable) -> Callable[[Path, int], None]:
    def save(folder: Path, seed: int) -> None:
        model, processor = builder(seed)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return save


def _save_sam(folder: Path, seed: int) -> None:
    import torch

    from cnc.tiny import tiny_sam

    torch.save(tiny_sam(seed).state_dict(), folder / TINY_SAM_FILE)


def _save_u2net(folder: Path, seed: int) -> None:
    import torch

    from cnc.u2net import U2NET_TINY, U2Net  # torch: heavy, only when the tiny U²-Net is written

    torch.manual_seed(seed)
    torch.save(U2Net(**U2NET_TINY).state_dict(), folder / TINY_U2NET_FILE)


def _savers() -> dict[str, Callable[[Path, int], None]]:
    from cnc import tiny

    return {"inpaint": _save_inpaint, "sd": _save_sd, "depth": _save_pair(tiny.tiny_dpt),
            "embed": _save_pair(tiny.tiny_clip_vision), "sam": _save_sam, "u2net": _save_u2net}


#: Tiny checkpoint kind of every config key (and ``cnc sample`` option) that takes a model.
KIND_OF_KEY = {
    "inpaint.model": "inpaint", "depth.model": "depth", "segment.saliency_model": "depth", "embed.model": "embed",
    "segment.sam_checkpoint": "sam", "segment.u2net_checkpoint": "u2net", "model.pretrained_model_name_or_path": "sd",
    "--depth-model": "depth", "--clip-model": "embed", "--image-encoder": "embed", "--sam-checkpoint": "sam",
}


def materialize(kind: str, seed: int = 0, root: Path | None = None) -> Path:
    """Path of the tiny ``kind`` checkpoint with ``seed`` (a folder; for ``sam`` the ``.pth`` file), made once.

    Args:
        kind: ``inpaint`` | ``sd`` | ``depth`` | ``embed`` | ``sam`` | ``u2net``.
        seed: torch seed of the random initialisation (the same seed always gives the same weights).
        root: cache folder (default :func:`cache_root`).
    """
    savers = _savers()
    if kind not in savers:
        raise ValueError(f"unknown tiny model kind {kind!r}; valid: {', '.join(sorted(savers))}")
    final = (root or cache_root()) / "tiny" / tiny_key() / f"{kind}-seed{seed}"
    if not final.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            savers[kind](tmp, seed)
            try:
                os.rename(tmp, final)  # atomic; fails when another process got there first
                log.info("tiny %s model (seed %d) written to %s", kind, seed, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / FILE_KINDS[kind] if kind in FILE_KINDS else final


def tiny_sam_architecture(checkpoint: str | None = None):
    """segment-anything ``Sam`` of the tiny architecture (weights from ``checkpoint`` when given).

    Registered as ``sam_model_type`` :data:`TINY_SAM_TYPE` beside segment-anything's ``vit_h`` / ``vit_l`` /
    ``vit_b`` builders.
    """
    import torch

    from cnc.tiny import tiny_sam

    with torch.random.fork_rng():  # the random init is overwritten; leave the caller's RNG alone
        sam = tiny_sam(0)
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam

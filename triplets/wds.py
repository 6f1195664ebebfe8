"""Decoders that give stock readers the triplet fields exactly as :func:`triplets.sample.decode_sample` does.

Stock WebDataset decoders go through PIL's 8-bit paths: ``.decode("rgb8")``, ``"l"``, ``"torchrgb"``... turn the
uint16 depth maps into near-constant 255 without an error. Pass :func:`decoder` instead::

    import webdataset as wds, triplets.wds
    ds = wds.WebDataset(urls).decode(triplets.wds.decoder())            # numpy
    ds = wds.WebDataset(urls).decode(triplets.wds.decoder(torch=True))  # torch tensors

Field by field (``R`` = resolution, ``D`` = embedding width):

================  =================================================================
``jpg``/``bg.jpg``   uint8 ``(R, R, 3)`` RGB (torch: ``(R, R, 3)`` uint8 too, HWC)
``mask.png``         uint8 ``(R, R)`` in {0, 1}
``*_depth.png``      uint16 ``(R, R)`` in [0, 65535] (near = 65535), never rescaled
``*_emb.npy``        float32 ``(D,)``
``txt``              ``str``
``json``             ``dict``
================  =================================================================

Every array collates with ``torch.utils.data.default_collate``. :func:`decode` does the same on a whole raw sample
(keys with or without a leading dot: wids, Ray Data's ``decoder=``, plain dicts of bytes).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from triplets.image_io import decode_png, decode_rgb


def _mask(data: bytes) -> np.ndarray:
    m = decode_png(data)
    if m.dtype != np.uint8:
        raise ValueError(f"mask.png must be 8-bit, got {m.dtype}")
    return (m > 127).astype(np.uint8)


def _depth(data: bytes) -> np.ndarray:
    d = decode_png(data)
    if d.dtype != np.uint16:
        raise ValueError(f"depth map must be a 16-bit PNG, got {d.dtype}")
    return d


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _text(data: bytes) -> str:
    return data.decode("utf-8")


def _json(data: bytes) -> dict:
    return json.loads(data)


#: Suffix → bytes decoder (the format of :mod:`triplets.sample`).
FIELD_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "jpg": decode_rgb, "bg.jpg": decode_rgb, "mask.png": _mask, "fg_depth.png": _depth, "bg_depth.png": _depth,
    "fg_emb.npy": _npy, "bg_emb.npy": _npy, "txt": _text, "json": _json,
}


def _to_torch(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))
    return x


class TripletHandler:
    """A WebDataset decoder handler: ``handler(".fg_depth.png", data)`` → the decoded field, ``None`` for suffixes it
    does not know (WebDataset then tries its default handlers).

    Args:
        torch: return ``torch.Tensor`` (same dtypes and shapes) instead of numpy arrays.
    """

    def __init__(self, torch: bool = False):
        self.torch = torch

    def __call__(self, key: str, data: bytes) -> Any:
        fn = FIELD_DECODERS.get(key.lstrip(".").lower())
        if fn is not None and hasattr(data, "read"):  # wids hands out file-like streams
            data = data.read()
        if fn is None or not isinstance(data, (bytes, bytearray)):
            return None
        out = fn(bytes(data))
        return _to_torch(out) if self.torch else out


def decoder(torch: bool = False) -> TripletHandler:
    """The handler to pass to ``webdataset.WebDataset(urls).decode(...)`` (see the module docstring)."""
    return TripletHandler(torch=torch)


def decode(sample: dict, torch: bool = False) -> dict:
    """Decode a whole raw sample ``{"__key__": ..., "jpg": bytes, ...}`` (keys may start with a dot, as in wids).

    Returns a dict keyed by the suffix without the dot; ``__key__``/``__url__``... and fields already decoded are
    kept as they are.
    """
    handler = TripletHandler(torch)
    out = {}
    for k, v in sample.items():
        name = k if k.startswith("__") else k.lstrip(".")
        decoded = None if k.startswith("__") else handler(name, v)
        out[name] = v if decoded is None else decoded
    return out


__all__ = ["FIELD_DECODERS", "TripletHandler", "decode", "decoder"]

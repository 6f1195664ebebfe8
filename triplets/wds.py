"""Decoders that give stock readers the triplet fields exactly as :func:`triplets.sample.decode_sample` does.

Stock WebDataset decoders go through PIL's 8-bit paths: ``.decode("rgb8")``, ``"l"``, ``"torchrgb"``... turn the
uint16 depth maps into near-constant 255 without an error. Pass :func:`decoder` instead::

    import webdataset as wds, triplets.wds
    ds = wds.WebDataset(urls).decode(triplets.wds.decoder())            # numpy
    ds = wds.WebDataset(urls).decode(triplets.wds.decoder(torch=True))  # torch tensors

Field by field, exactly :data:`triplets.sample.SAMPLE_FIELDS` (the same decoders as
:func:`~triplets.sample.decode_sample`): ``jpg``/``bg.jpg`` uint8 ``(R, R, 3)`` RGB (torch: HWC uint8 too),
``mask.png`` uint8 ``(R, R)`` in {0, 1}, ``*_depth.png`` uint16 ``(R, R)`` never rescaled, ``*_emb.npy`` float32
``(D,)``, ``latent.npy`` float16 ``(2, 4, R/8, R/8)``, ``txt`` ``str``, ``json`` ``dict``.

Every array collates with ``torch.utils.data.default_collate``. :func:`decode` does the same on a whole raw sample
(keys with or without a leading dot: wids, Ray Data's ``decoder=``, plain dicts of bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from triplets.sample import SAMPLE_FIELDS

#: Suffix → bytes decoder: the decoders of :data:`triplets.sample.SAMPLE_FIELDS`.
FIELD_DECODERS: dict[str, Callable[[bytes], Any]] = {f.suffix: f.decode_member for f in SAMPLE_FIELDS}


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

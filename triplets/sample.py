"""The triplet sample format: one WebDataset sample per source image.

:data:`SAMPLE_FIELDS` is the one table of the format's members (suffix, :class:`TripletSample` attribute, stored
form, meaning, Hugging Face feature, encoder and decoder). Everything else is derived from it: :func:`encode_sample`
and :func:`decode_sample` (the only (de)serialisers; masks and depth maps round-trip bit-exactly), the stock-reader
decoder :mod:`triplets.wds`, the dataset card's field table (:mod:`triplets.card`) and the README's table (checked by
``tests/triplets/test_sample.py``; :func:`fields_markdown` prints it).

Raw disparity is recoverable: ``raw = min + (u16 / 65535) * (max - min)`` with the ``json``'s ``fg_depth_range`` /
``bg_depth_range``.

Keys are dot-free (a dot would split the sample in every WebDataset reader) and derived from the source path, so they
are stable across runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnc.base import jsonio
from triplets.image_io import decode_png, decode_rgb, encode_jpeg, encode_png

#: Metadata keys every sample's ``json`` holds.
REQUIRED_META: tuple[str, ...] = (
    "key", "source", "original_size", "crop_box", "resolution", "seed", "models", "mask_area",
    "fg_depth_range", "bg_depth_range", "timings", "version",
)
DEPTH_MAX = 65535
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_/-]+$")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_/-]")


def make_key(source_id: str) -> str:
    """Derive a stable, dot-free WebDataset key from a source identity (relative path, image id...).

    The file extension is dropped; characters outside ``[A-Za-z0-9_/-]`` become ``_``. When
    anything had to be replaced, an 8-hex digest of the original id is appended so that two ids
    differing only in replaced characters (``a.b`` / ``a_b``) stay distinct.
    """
    stem = source_id.strip().strip("/")
    last = stem.rsplit("/", 1)[-1]
    if "." in last:
        stem = stem[: len(stem) - len(last)] + last.rsplit(".", 1)[0]
    clean = _BAD_KEY_CHARS.sub("_", stem).strip("/") or "_"
    clean = re.sub("/+", "/", clean)
    if clean.startswith("_"):
        clean = "k" + clean  # a leading underscore marks metadata in WebDataset
    if clean != stem:
        clean = f"{clean}_{hashlib.sha1(source_id.encode()).hexdigest()[:8]}"
    return clean


def quantize_depth(depth: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Min-max normalise one raw disparity map and quantise it to uint16 (:func:`quantize_depth_batch` of one map).

    Args:
        depth: ``(H, W)`` float raw disparity (any range; near = large).

    Returns:
        ``(H, W)`` uint16 in [0, 65535] and the raw ``(min, max)``. A constant map gives zeros.

    Raises:
        ValueError: the map has a non-finite value.
    """
    q, ranges, finite = quantize_depth_batch(np.asarray(depth)[None])
    if not finite[0]:
        raise ValueError("depth map has non-finite values")
    return q[0], (float(ranges[0, 0]), float(ranges[0, 1]))


def quantize_depth_batch(depth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max normalise every raw disparity map of a batch and quantise it to uint16, where the maps are.

    ``q = round((d - min) / (max - min) · 65535)`` per map, in float64 (round half to even). Maps on an accelerator
    are quantised there (:func:`_quantize_on_device`) and only 16-bit integers come back to the host, instead of
    float32 maps and host work between model calls; NumPy arrays and CPU tensors are quantised by NumPy (faster
    than torch on a CPU). Both give the same bits (float64 IEEE arithmetic; ``tests/triplets/test_sample.py``).

    Args:
        depth: ``(N, H, W)`` float raw disparity, a NumPy array or a torch tensor on any device.

    Returns:
        ``(q (N, H, W) uint16, ranges (N, 2) float64 raw [min, max], finite (N,) bool)``; a constant map gives zeros,
        a map with a non-finite value ``finite`` False (its ``q`` is meaningless).
    """
    if not isinstance(depth, np.ndarray) and depth.device.type != "cpu":
        return _quantize_on_device(depth)
    d = np.asarray(depth, dtype=np.float64)
    flat = d.reshape(len(d), -1)
    finite = np.isfinite(flat).all(1)
    lo, hi = flat.min(1, initial=np.inf), flat.max(1, initial=-np.inf)
    q = np.zeros(d.shape, np.uint16)
    for i in np.flatnonzero(finite & (hi > lo)):
        q[i] = np.round((d[i] - lo[i]) / (hi[i] - lo[i]) * DEPTH_MAX)
    return q, np.stack([lo, hi], 1), finite


def _quantize_on_device(depth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`quantize_depth_batch` on the tensor's device; the result crosses to the host as int16 (2 bytes per
    pixel: ``q - 32768``, whose bits are ``q`` with the top bit flipped)."""
    import torch

    d = depth.to(torch.float64)
    flat = d.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    finite = torch.isfinite(flat).all(1)
    q = torch.round((d - lo[:, None, None]) / (hi - lo)[:, None, None] * DEPTH_MAX)
    q = torch.where(((hi > lo) & finite)[:, None, None], q, 0.0)
    shifted = (q.to(torch.int32) - 32768).to(torch.int16).cpu().numpy()
    return shifted.view(np.uint16) ^ np.uint16(0x8000), torch.stack([lo, hi], 1).cpu().numpy(), finite.cpu().numpy()


def depth_to_float(depth_u16: np.ndarray, depth_range: tuple[float, float] | None = None) -> np.ndarray:
    """uint16 depth → float32: normalised [0, 1], or raw disparity when ``depth_range`` is given."""
    x = depth_u16.astype(np.float32) / DEPTH_MAX
    if depth_range is None:
        return x
    lo, hi = depth_range
    return (lo + x * (hi - lo)).astype(np.float32)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _mask(data: bytes) -> np.ndarray:
    mask = decode_png(data)
    if mask.dtype != np.uint8:
        raise ValueError(f"must be 8-bit, got {mask.dtype}")
    return (mask > 127).astype(np.uint8)


def _depth(data: bytes) -> np.ndarray:
    depth = decode_png(data)
    if depth.dtype != np.uint16:
        raise ValueError(f"must be a 16-bit PNG, got {depth.dtype}")
    return depth


def _latent(data: bytes) -> np.ndarray:
    latent = _npy(data)
    if latent.dtype != np.float16 or latent.ndim != 4 or latent.shape[0] != 2:
        raise ValueError(f"must be (2, C, h, w) float16, got {latent.dtype} {latent.shape}")
    return latent


def _meta(data) -> dict:
    meta = jsonio.loads(data, what="")  # decode_sample prefixes "json" if isinstance(data, (bytes, str)) else data
    if not isinstance(meta, dict):
        raise ValueError(f"is not a JSON object (got {type(meta).__name__})")
    return dict(meta)


def _text(data) -> str:
    return data.decode("utf-8") if isinstance(data, bytes) else str(data)


@dataclass(frozen=True)
class SampleField:
    """One member of a sample.

    Attributes:
        suffix: the member's suffix (``key.<suffix>`` in the tar).
        attr: the :class:`TripletSample` attribute it holds.
        stored: how it is stored (codec, dtype and shape; ``R`` = resolution, ``D`` = embedding width).
        content: what it is (Markdown; the README's and the dataset card's text).
        feature: the Hugging Face ``datasets`` feature it loads as.
        encode: ``(value, jpeg_quality) -> bytes``.
        decode: ``bytes -> value``; raises ``ValueError`` (without the field's name) when the bytes are not this
            field's form.
        required: every sample holds it (``latent.npy`` is optional: ``latents.enabled``).
    """

    suffix: str
    attr: str
    stored: str
    content: str
    feature: str
    encode: Callable[[Any, int], bytes]
    decode: Callable[[bytes], Any]
    required: bool = True

    def decode_member(self, data: bytes) -> Any:
        """:attr:`decode`, with the field's name in the error (``fg_depth.png must be a 16-bit PNG, got uint8``)."""
        try:
            return self.decode(data)
        except ValueError as exc:
            raise ValueError(f"{self.suffix} {exc}") from None


#: The sample format, member by member (see the module docstring): the one table everything else derives from.
SAMPLE_FIELDS: tuple[SampleField, ...] = (
    SampleField("jpg", "image", "JPEG, RGB uint8 (R, R, 3)", "*I*, the photo after resize + centre crop", "image",
                lambda v, q: encode_jpeg(v, q), decode_rgb),
    SampleField("mask.png", "mask", "PNG, uint8 (R, R), values {0, 255} (decoded: {0, 1})",
                "*M*, the salient-object mask, binary", "image",
                lambda v, q: encode_png((v * 255).astype(np.uint8)), _mask),
    SampleField("bg.jpg", "background", "JPEG, RGB uint8 (R, R, 3)", "*I_b*, the inpainted background", "image",
                lambda v, q: encode_jpeg(v, q), decode_rgb),
    SampleField("fg_depth.png", "fg_depth", "PNG, **uint16** (R, R)",
                "MiDaS disparity of *I_f = I⊙M* (near = large), min-max normalised per map", "image",
                lambda v, q: encode_png(v), _depth),
    SampleField("bg_depth.png", "bg_depth", "PNG, **uint16** (R, R)",
                "MiDaS disparity of *I_b*, min-max normalised per map", "image", lambda v, q: encode_png(v), _depth),
    SampleField("fg_emb.npy", "fg_emb", "float32 (D,), D = 768 for ViT-L/14",
                "CLIP `image_embeds` of *I* (reference behaviour; `embed.fg_source: foreground` uses *I_f*)", "numpy",
                lambda v, q: _npy_bytes(v.astype(np.float32)), _npy),
    SampleField("bg_emb.npy", "bg_emb", "float32 (D,)", "CLIP `image_embeds` of *I_b*", "numpy",
                lambda v, q: _npy_bytes(v.astype(np.float32)), _npy),
    SampleField("txt", "caption", "UTF-8", "caption", "string", lambda v, q: v.encode("utf-8"), _text),
    SampleField("latent.npy", "latent", "float16 (2, 4, R/8, R/8)",
                "optional (`latents.enabled`): VAE latent distribution of *I* — mean, log-variance (unscaled)",
                "numpy", lambda v, q: _npy_bytes(v), _latent, required=False),
    SampleField("json", "meta", "JSON",
                "source id, original size, crop box, inpainting seed, model ids, revisions and identities (hub commit "
                "or weight hash), mask area and source, raw depth ranges `fg_depth_range`/`bg_depth_range` = "
                "[min, max], timings (with `sample_timings: true`), package version, `quality` scores", "json",
                lambda v, q: json.dumps(v, sort_keys=True, ensure_ascii=False).encode("utf-8"), _meta),
)
FIELD_BY_SUFFIX: dict[str, SampleField] = {f.suffix: f for f in SAMPLE_FIELDS}
#: Every sample carries every one of these suffixes (readers such as HF datasets require it).
FIELDS: tuple[str, ...] = tuple(f.suffix for f in SAMPLE_FIELDS if f.required)
#: Optional member: the VAE latent distribution of I (``latents.enabled``; see :class:`TripletSample`).
LATENT_FIELD = "latent.npy"


def fields_markdown() -> str:
    """The README's table of :data:`SAMPLE_FIELDS` (``| suffix | content | dtype / shape |``)."""
    rows = ["| suffix | content | dtype / shape |", "|---|---|---|"]
    rows += [f"| `{f.suffix}` | {f.content} | {f.stored} |" for f in SAMPLE_FIELDS]
    return "\n".join(rows)


@dataclass
class TripletSample:
    """One decoded triplet (R = resolution, D = embedding width).

    Attributes:
        key: dot-free sample key.
        image: ``(R, R, 3)`` uint8 RGB, I.
        mask: ``(R, R)`` uint8 in {0, 1}, M.
        background: ``(R, R, 3)`` uint8 RGB, I_b.
        fg_depth / bg_depth: ``(R, R)`` uint16, min-max normalised disparity (near = 65535).
        fg_emb / bg_emb: ``(D,)`` float32 CLIP ``image_embeds``.
        caption: the text.
        meta: the ``json`` metadata (see :data:`REQUIRED_META`).
        latent: optional ``latent.npy`` (build option ``latents.enabled``): ``(2, 4, r, r)`` float16, the VAE latent
            distribution of I at ``r = latents.resolution / 8``, row 0 the mean, row 1 the log-variance (unscaled:
            the trainer multiplies a sample by the VAE's ``scaling_factor``).
    """

    key: str
    image: np.ndarray
    mask: np.ndarray
    background: np.ndarray
    fg_depth: np.ndarray
    bg_depth: np.ndarray
    fg_emb: np.ndarray
    bg_emb: np.ndarray
    caption: str
    meta: dict = field(default_factory=dict)
    latent: np.ndarray | None = None

    @property
    def foreground(self) -> np.ndarray:
        """I_f = I ⊙ M, ``(R, R, 3)`` uint8 (object on black)."""
        return self.image * self.mask[..., None]

    def fg_depth_float(self, raw: bool = False) -> np.ndarray:
        return depth_to_float(self.fg_depth, tuple(self.meta["fg_depth_range"]) if raw else None)

    def bg_depth_float(self, raw: bool = False) -> np.ndarray:
        return depth_to_float(self.bg_depth, tuple(self.meta["bg_depth_range"]) if raw else None)


def validate_sample(s: TripletSample) -> list[str]:
    """Return a list of problems (empty when the sample is well-formed)."""
    problems = []
    if not KEY_PATTERN.match(s.key):
        problems.append(f"key {s.key!r} is not dot-free [A-Za-z0-9_/-]")
    if s.image.ndim != 3 or s.image.shape[2] != 3 or s.image.dtype != np.uint8:
        problems.append(f"jpg: expected (H,W,3) uint8, got {s.image.dtype} {s.image.shape}")
    hw = s.image.shape[:2]
    for name, arr, dtype in (("mask.png", s.mask, np.uint8), ("fg_depth.png", s.fg_depth, np.uint16),
                             ("bg_depth.png", s.bg_depth, np.uint16)):
        if arr.dtype != dtype or arr.shape != hw:
            problems.append(f"{name}: expected {hw} {np.dtype(dtype).name}, got {arr.shape} {arr.dtype}")
    if s.background.shape != s.image.shape or s.background.dtype != np.uint8:
        problems.append(f"bg.jpg: expected {s.image.shape} uint8, got {s.background.shape} {s.background.dtype}")
    if s.mask.dtype == np.uint8 and not np.isin(s.mask, (0, 1)).all():
        problems.append("mask.png: values other than 0/255")
    for name, emb in (("fg_emb.npy", s.fg_emb), ("bg_emb.npy", s.bg_emb)):
        if emb.dtype != np.float32 or emb.ndim != 1:
            problems.append(f"{name}: expected float32 (D,), got {emb.dtype} {emb.shape}")
    if s.fg_emb.shape != s.bg_emb.shape:
        problems.append(f"fg_emb/bg_emb dims differ: {s.fg_emb.shape} vs {s.bg_emb.shape}")
    for name, emb in (("fg_emb.npy", s.fg_emb), ("bg_emb.npy", s.bg_emb)):
        if emb.dtype.kind == "f" and not np.isfinite(emb).all():
            problems.append(f"{name}: non-finite values (NaN/inf)")
    if s.latent is not None:
        lat = np.asarray(s.latent)
        if lat.dtype != np.float16 or lat.ndim != 4 or lat.shape[0] != 2:
            problems.append(f"latent.npy: want (2, C, h, w) float16, got {lat.dtype} {lat.shape}")
        elif not np.isfinite(lat).all():
            problems.append("latent.npy: non-finite values (NaN/inf)")
    problems += validate_meta(s.meta)
    return problems


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numbers(x, n: int) -> bool:
    return isinstance(x, list) and len(x) == n and all(_finite(v) for v in x)


def validate_meta(meta) -> list[str]:
    """Problems of a sample's ``json`` metadata: not an object, missing keys, NaN or wrong-typed values.

    Depth ranges must be ``[lo, hi]`` finite numbers with ``lo <= hi``; ``mask_area`` a finite number in [0, 1];
    the other keys must have their type when not null (null = unknown, tolerated).
    """
    if not isinstance(meta, dict):
        return [f"json: not a JSON object (got {type(meta).__name__})"]
    problems = []
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        problems.append(f"json: missing keys {missing}")
    for k in ("fg_depth_range", "bg_depth_range"):
        if k in meta and not (_numbers(meta[k], 2) and meta[k][0] <= meta[k][1]):
            problems.append(f"json: {k} must be [min, max] finite numbers, got {str(meta[k])[:60]}")
    checks = {
        "mask_area": lambda v: _finite(v) and 0 <= v <= 1, "original_size": lambda v: _numbers(v, 2),
        "crop_box": lambda v: _numbers(v, 5), "resolution": lambda v: isinstance(v, int) and not isinstance(v, bool)
        and v > 0, "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "key": lambda v: isinstance(v, str), "source": lambda v: isinstance(v, str),
        "version": lambda v: isinstance(v, str), "models": lambda v: isinstance(v, dict),
        "timings": lambda v: isinstance(v, dict), "quality": lambda v: isinstance(v, dict),
    }
    for k, ok in checks.items():
        if meta.get(k) is not None and not ok(meta[k]):
            problems.append(f"json: {k} has a wrong type or value: {str(meta[k])[:60]}")
    return problems


def encode_sample(s: TripletSample, jpeg_quality: int = 95) -> dict:
    """Serialise a sample to a WebDataset dict ``{"__key__": key, suffix: bytes, ...}``.

    Raises:
        ValueError: if the sample is malformed (see :func:`validate_sample`).
    """
    problems = validate_sample(s)
    if problems:
        raise ValueError(f"sample {s.key!r} is malformed: " + "; ".join(problems))
    out = {"__key__": s.key}
    for f in SAMPLE_FIELDS:
        value = getattr(s, f.attr)
        if value is not None or f.required:
            out[f.suffix] = f.encode(value, jpeg_quality)
    return out


def decode_sample(raw: dict) -> TripletSample:
    """Inverse of :func:`encode_sample` (accepts keys with or without a leading dot).

    Raises:
        KeyError: naming the missing field when the sample is incomplete.
        ValueError: when a field does not decode.
    """
    d = {k.lstrip("."): v for k, v in raw.items()}
    missing = [f for f in FIELDS if f not in d]
    if missing:
        raise KeyError(f"sample {d.get('__key__')!r} lacks fields {missing}")
    values = {f.attr: f.decode_member(d[f.suffix]) for f in SAMPLE_FIELDS if f.suffix in d}
    return TripletSample(key=d["__key__"], **values)

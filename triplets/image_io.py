"""Safe image decoding and the resize/centre-crop geometry shared by every field.

Decoding is strict: corrupt, truncated, empty or non-image bytes, decompression bombs
(over ``max_pixels``) and images whose short side is below ``min_side`` raise
:class:`~triplets.errors.SampleError` with a clear reason. CMYK, RGBA, palette, grayscale
and 16-bit images are converted to 8-bit RGB; EXIF orientation is applied first.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from triplets.errors import SampleError

#: Default pixel limit: 64 megapixels. Larger images are rejected as possible decompression bombs.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class CropBox:
    """The region of the resized image kept by the centre crop, in resized pixels.

    ``scale`` maps original pixels to resized ones; ``left``/``top`` are the crop offsets.
    """

    scale: float
    left: int
    top: int
    width: int
    height: int

    def as_list(self) -> list:
        return [self.left, self.top, self.width, self.height, self.scale]


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on black, 16-bit scaled to 8)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        arr8 = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255 + 0.5).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        base = Image.new("RGB", rgba.size, (0, 0, 0))
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    return img.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0) -> np.ndarray:
    """Decode encoded image bytes to an ``(H, W, 3)`` uint8 RGB array.

    Raises:
        SampleError: (stage ``decode``) for empty, corrupt, truncated or non-image data, images over
            ``max_pixels`` or with a short side below ``min_side``.
    """
    if not data:
        raise SampleError("decode", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own guard at the same limit (process-wide)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise SampleError("decode", f"decompression bomb? {w}x{h}={w * h} pixels, over the limit of "
                                            f"{max_pixels} (max_pixels)")
            img = ImageOps.exif_transpose(img)
            img.load()
    except SampleError:
        raise
    except UnidentifiedImageError:
        raise SampleError("decode", "not an image (unidentified format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL raises at open, before the size check above, and quotes its own limit (2 x max_pixels for the error)
        m = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(m.group(1))} pixels" if m else "an image"
        raise SampleError("decode", f"decompression bomb? {size}, over the limit of {max_pixels} (max_pixels)") \
            from None
    except OSError as exc:
        msg = str(exc)
        reason = "truncated image file" if "truncated" in msg.lower() else f"corrupt image: {msg}"
        raise SampleError("decode", reason) from None
    except Exception as exc:  # noqa: BLE001 - any decoder crash is a per-sample failure
        raise SampleError("decode", f"corrupt image: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if min(w, h) < min_side:
        raise SampleError("decode", f"image too small: short side {min(w, h)} px < min_side {min_side}")
    return np.asarray(_to_rgb(img), dtype=np.uint8).copy()


def resize_center_crop(image: np.ndarray, resolution: int, *, nearest: bool = False) -> tuple[np.ndarray, CropBox]:
    """Resize the short side to ``resolution`` (bicubic, or nearest for label maps) and centre-crop a square.

    Args:
        image: ``(H, W, C)`` or ``(H, W)`` uint8.
        resolution: output side in pixels.
        nearest: nearest-neighbour resampling (for masks / label maps; never invents labels).

    Returns:
        ``(resolution, resolution[, C])`` uint8 array and the :class:`CropBox`.
    """
    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    pil = Image.fromarray(image)
    pil = pil.resize((new_w, new_h), Image.NEAREST if nearest else Image.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    pil = pil.crop((left, top, left + resolution, top + resolution))
    return np.asarray(pil, dtype=np.uint8).copy(), CropBox(scale, left, top, resolution, resolution)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """``(H, W, 3)`` uint8 RGB → JPEG bytes (deterministic for the same input and libjpeg)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    """Single-channel uint8 or uint16 ``(H, W)`` → lossless PNG bytes (16-bit kept)."""
    import cv2

    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png takes a 2-D uint8/uint16 array, got {array.dtype} {array.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def image_size(data: bytes) -> tuple[int, int]:
    """``(W, H)`` from the image header only (nothing is decoded: safe before a size limit check).

    PNG headers are parsed directly (no pixel limit applies here); other formats go through PIL's lazy open.

    Raises:
        ValueError: when the header cannot be read.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError as exc:
        raise ValueError(f"decompression bomb: {exc}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"unreadable image header ({exc})") from None


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → ``(H, W)`` array with the stored bit depth (uint8 or uint16), never converted."""
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("not a decodable PNG")
    if arr.ndim != 2:
        raise ValueError(f"expected a single-channel PNG, got shape {arr.shape}")
    return arr


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes of a stored sample image → ``(H, W, 3)`` uint8 RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()

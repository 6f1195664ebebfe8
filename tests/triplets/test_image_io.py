"""Bad and odd inputs: each bad kind gets a clear reason; odd-but-valid images are converted and kept."""

import io

import numpy as np
import pytest
from PIL import Image

from triplets.errors import SampleError
from triplets.image_io import decode_image, resize_center_crop


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w=320, h=280) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128.0)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is a text file with a .jpg name\n", "not an image"),
    (bytes(range(256)) * 40, "not an image"),
])
def test_empty_and_non_images_are_rejected_with_reason(data, reason):
    with pytest.raises(SampleError, match=reason) as info:
        decode_image(data)
    assert info.value.stage == "decode"


def test_truncated_jpeg_is_rejected():
    data = _bytes(_photo(), "JPEG", quality=90)
    with pytest.raises(SampleError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = _bytes(Image.new("1", (12000, 12000)), "PNG")  # 144 Mpx, a few kB on disk
    assert len(bomb) < 200_000
    with pytest.raises(SampleError, match=r"^decode: decompression bomb\? 144000000 pixels, over the limit of "
                                          r"64000000 \(max_pixels\)$"):  # the configured limit, not PIL's 2x
        decode_image(bomb, max_pixels=64_000_000)


def test_small_images_are_rejected_with_their_size():
    with pytest.raises(SampleError, match="short side 200 px < min_side 256"):
        decode_image(_bytes(_photo(300, 200), "PNG"), min_side=256)


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "L", "P", "LA", "I;16", "I"])
def test_odd_modes_become_rgb(mode):
    src = _photo()
    img = src.convert(mode) if mode not in ("I;16", "I") else Image.fromarray(
        np.asarray(src.convert("L"), np.uint16) * 257)
    if mode == "I":
        img = img.convert("I")
    fmt = {"CMYK": "JPEG", "I": "TIFF"}.get(mode, "PNG")
    out = decode_image(_bytes(img, fmt))
    assert out.dtype == np.uint8 and out.shape == (280, 320, 3)
    if mode in ("I;16", "L", "I"):
        # grayscale content preserved (16-bit scaled down to 8 bits)
        gray = np.asarray(src.convert("L"), np.int16)
        assert np.abs(out[..., 0].astype(np.int16) - gray).max() <= 1


def test_rgba_alpha_is_composited_on_black():
    arr = np.zeros((300, 300, 4), np.uint8)
    arr[..., :3] = 200
    arr[:, :150, 3] = 255
    out = decode_image(_bytes(Image.fromarray(arr, "RGBA"), "PNG"))
    assert out[:, :150].min() == 200 and out[:, 150:].max() == 0


def test_exif_orientation_is_applied():
    img = _photo(320, 280)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    data = _bytes(img, "JPEG", exif=exif.tobytes())
    out = decode_image(data)
    assert out.shape == (320, 280, 3)


def test_resize_center_crop_geometry_and_nearest_labels():
    img = np.asarray(_photo(400, 200))
    out, box = resize_center_crop(img, 100)
    assert out.shape == (100, 100, 3)
    assert box.scale == 0.5 and box.left == 50 and box.top == 0
    labels = np.zeros((200, 400), np.uint8)
    labels[:, 200:] = 7
    lab, _ = resize_center_crop(labels, 100, nearest=True)
    assert set(np.unique(lab)) == {0, 7}

"""Issue 11.5: 16-bit dataset masks threshold at their bit depth; mask size limits before a full decode."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from triplets.image_io import encode_png
from triplets.stages.load import LoadStage


def _jpeg(path: Path, w: int = 64, h: int = 48) -> str:
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG")
    return str(path)


def _row(img: str, mask: str, kind: str = "binary") -> dict:
    return {"key": ["k"], "source": [img], "caption": [""], "mask_path": [mask], "mask_kind": [kind]}


def test_16bit_binary_mask_is_thresholded_before_any_uint8_cast(tmp_path):
    img = _jpeg(tmp_path / "a.jpg")
    labels = np.zeros((48, 64), np.uint16)
    labels[:, :32] = 65535   # foreground: 65535 % 256 = 255 would pass either way
    labels[:24, 32:] = 256   # background (256 << 32767), but 256 % 256 = 0 -> fine either way
    labels[24:, 32:] = 33024  # foreground (> 32767) although 33024 % 256 = 0: lost by a uint8 cast
    labels[:, :8] = 200      # background (<= 32767) although 200 > 127 as uint8
    (tmp_path / "m.png").write_bytes(encode_png(labels))
    cols, failures = LoadStage(resolution=32, min_side=16).process(_row(img, str(tmp_path / "m.png")))
    assert failures == {}
    mask = cols["dataset_mask"][0]
    # 64x48 -> 43x32 then centre crop 32: columns 5.. of the resized map; check regions away from edges
    expected = (np.where(labels > 32767, 1, 0)).astype(np.uint8)
    ref = np.asarray(Image.fromarray(expected * 255).resize((43, 32), Image.NEAREST))[:, 5:37] // 255
    assert np.array_equal(mask, ref)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (8-bit gray) with a tiny, incomplete IDAT: decoding it fully would need
    w*h bytes; reading the header is free."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_mask_over_max_pixels_is_refused_from_its_header(tmp_path, monkeypatch):
    from triplets.stages import load

    img = _jpeg(tmp_path / "a.jpg")
    (tmp_path / "huge.png").write_bytes(_png_header_only(30000, 30000))

    def no_decode(data):
        raise AssertionError("the mask was decoded before its size was checked")

    monkeypatch.setattr(load, "decode_png", no_decode)
    _, failures = LoadStage(resolution=32, min_side=16, max_pixels=10_000).process(_row(img, str(tmp_path / "huge.png")))
    assert "over the limit" in failures[0] and "max_pixels" in failures[0]
    # a mask of the wrong size is also refused before decoding
    (tmp_path / "small.png").write_bytes(_png_header_only(10, 10))
    _, failures = LoadStage(resolution=32, min_side=16).process(_row(img, str(tmp_path / "small.png")))
    assert "10x10 != image 64x48" in failures[0]


def test_8bit_and_cocostuff_masks_unchanged(tmp_path):
    img = _jpeg(tmp_path / "a.jpg")
    labels = np.full((48, 64), 255, np.uint8)
    labels[10:40, 10:50] = 3  # a thing class
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, "PNG")
    (tmp_path / "c.png").write_bytes(buf.getvalue())
    cols, failures = LoadStage(resolution=32, min_side=16).process(_row(img, str(tmp_path / "c.png"), "cocostuff"))
    assert failures == {} and 0 < cols["dataset_mask"][0].mean() < 1

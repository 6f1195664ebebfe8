"""``load``: read, decode and geometrically normalise the source image (CPU only).

Input rows: ``key``, ``source``, ``caption``, ``mask_path``, ``mask_kind`` (the reader's items), and optionally
``fetched``: ``(image, mask)`` :class:`~triplets.fetch.Fetched` pairs already read (the shard worker streams a
whole shard through the stage's :class:`~triplets.fetch.Fetcher` ahead of decoding); without it the stage reads the
batch's sources itself through the same fetcher. A source that cannot be read fails with stage ``fetch``.
Output columns: ``image`` ``(N, R, R, 3)`` uint8, ``dataset_mask`` ``(N, R, R)`` uint8 {0,1}
(all zeros and ``has_dataset_mask`` False when the item has none), ``original_size`` ``(N, 2)``
int (W, H), ``crop_box`` ``(N, 5)`` float (left, top, width, height, scale).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from triplets.errors import SampleError
from triplets.fetch import Fetched, Fetcher
from triplets.image_io import CropBox, decode_image, decode_png, image_size, resize_center_crop
from triplets.stages.base import Stage

#: COCO-Stuff label ids 0..90 are things (0 = person); 91..181 stuff; 255 unlabeled.
COCOSTUFF_THING_MAX = 90


def dataset_mask_from_labels(labels: np.ndarray, kind: str) -> np.ndarray:
    """Binary {0,1} uint8 mask from a stored mask/label map at its stored bit depth (never cast first).

    ``binary``: foreground above half range (> 127 for 8-bit, > 32767 for 16-bit). ``cocostuff``: union of thing
    classes (labels 0..90).
    """
    if labels.ndim == 3:
        labels = labels[..., 0]
    if kind == "cocostuff":
        return (labels <= COCOSTUFF_THING_MAX).astype(np.uint8)
    return (labels > (127 if labels.dtype == np.uint8 else 32767)).astype(np.uint8)


def load_photo(data: bytes, size: int | tuple[int, int], *, mask_data: bytes | None = None,
               mask_kind: str | None = None, max_pixels: int = 64_000_000,
               min_side: int = 0) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int], CropBox]:
    """Decode a photo (and its dataset mask) and crop both with the build's geometry.

    The one decode + crop of the project: the ``load`` stage runs it on every source, ``cnc sample`` and
    :func:`cnc_model.compose.compose` on their photos (so a photo sampled at the build resolution is the image the
    build saw, bit for bit).

    Args:
        data: encoded image bytes.
        size: output side (square, as the build) or ``(height, width)``.
        mask_data / mask_kind: encoded dataset mask (PNG at the image's size) and its rule
            (:func:`dataset_mask_from_labels`: ``binary`` or ``cocostuff``).

    Returns:
        ``(image (h, w, 3) uint8, mask (h, w) uint8 {0,1} or None, original (W, H), CropBox)``.

    Raises:
        SampleError: (stage ``decode``) undecodable, too large or too small inputs, a mask of another size.
    """
    img = decode_image(data, max_pixels=max_pixels, min_side=min_side)
    h, w = img.shape[:2]
    out, box = resize_center_crop(img, size)
    if mask_data is None:
        return out, None, (w, h), box
    try:
        mw, mh = image_size(mask_data)  # header only: the size checks come before a full decode
    except ValueError as exc:
        raise SampleError("decode", f"dataset mask unreadable: {exc}") from None
    if mw * mh > max_pixels:
        raise SampleError("decode", f"dataset mask {mw}x{mh}={mw * mh} pixels is over the limit of "
                                    f"{max_pixels} (max_pixels)")
    if (mh, mw) != (h, w):
        raise SampleError("decode", f"dataset mask size {mw}x{mh} != image {w}x{h}")
    try:
        labels = decode_png(mask_data)
    except ValueError as exc:
        raise SampleError("decode", f"dataset mask unreadable: {exc}") from None
    # threshold at the stored bit depth, then resize the {0,1} mask (a uint8 cast of 16-bit labels wraps)
    binary = dataset_mask_from_labels(labels, mask_kind or "binary")
    mask, _ = resize_center_crop(binary, size, nearest=True)
    return out, mask, (w, h), box


class LoadStage(Stage):
    """Decode + resize/centre-crop every field to ``resolution`` (:func:`load_photo`)."""

    name = "decode"

    def __init__(self, resolution: int = 512, min_side: int = 256, max_pixels: int = 64_000_000,
                 fetch: dict | None = None, decode_threads: int = 1):
        self.resolution, self.min_side, self.max_pixels = resolution, min_side, max_pixels
        self.fetcher = Fetcher(fetch)  # the build's ``fetch:`` section (dict); threads start on first read
        self.decode_threads = max(1, decode_threads)  # rows decoded at once (PIL releases the GIL); same pixels
        self._pool: ThreadPoolExecutor | None = None

    def _try_one(self, row: dict, fetched: tuple) -> tuple | SampleError:
        try:
            return self._load_one(row, fetched)
        except SampleError as exc:
            return exc

    def _load_one(self, row: dict, fetched: tuple[Fetched, Fetched | None]) -> tuple:
        image_bytes, mask_bytes = fetched
        if not image_bytes.ok:
            raise SampleError("fetch", image_bytes.reason)
        mask_data = None
        if row.get("mask_path"):
            if mask_bytes is None or not mask_bytes.ok:
                raise SampleError("fetch", f"dataset mask: {mask_bytes.reason if mask_bytes else 'not read'}")
            mask_data = mask_bytes.data
        out, mask, size, box = load_photo(image_bytes.data, self.resolution, mask_data=mask_data,
                                          mask_kind=row.get("mask_kind"), max_pixels=self.max_pixels,
                                          min_side=self.min_side)
        has_mask = mask is not None
        if mask is None:
            mask = np.zeros(out.shape[:2], np.uint8)
        return out, mask, has_mask, size, box.as_list()

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:
        n = len(rows["key"])
        r = self.resolution
        cols = {"image": np.zeros((n, r, r, 3), np.uint8), "dataset_mask": np.zeros((n, r, r), np.uint8),
                "has_dataset_mask": np.zeros(n, bool), "original_size": np.zeros((n, 2), np.int64),
                "crop_box": np.zeros((n, 5), np.float64)}
        failures: dict[int, str | tuple[str, str]] = {}
        items = [{k: v[i] for k, v in rows.items() if k != "fetched"} for i in range(n)]
        fetched = rows["fetched"] if "fetched" in rows else list(self.fetcher.map_items(items))
        if self.decode_threads > 1 and n > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.decode_threads, "cnc-decode-row")
            results = list(self._pool.map(self._try_one, items, fetched))
        else:
            results = [self._try_one(row, f) for row, f in zip(items, fetched)]
        for i, got in enumerate(results):
            if isinstance(got, SampleError):
                failures[i] = got.reason if got.stage == self.name else (got.stage, got.reason)
                continue
            img, mask, has_mask, size, box = got
            cols["image"][i], cols["dataset_mask"][i], cols["has_dataset_mask"][i] = img, mask, has_mask
            cols["original_size"][i], cols["crop_box"][i] = size, box
        return cols, failures

    def empty(self, batch: dict) -> dict:
        n, r = len(batch["key"]), self.resolution
        return {"image": np.zeros((n, r, r, 3), np.uint8), "dataset_mask": np.zeros((n, r, r), np.uint8),
                "has_dataset_mask": np.zeros(n, bool), "original_size": np.zeros((n, 2), np.int64),
                "crop_box": np.zeros((n, 5), np.float64)}

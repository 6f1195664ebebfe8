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
from triplets.image_io import decode_image, decode_png, image_size, resize_center_crop
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


class LoadStage(Stage):
    """Decode + resize/centre-crop every field to ``resolution``."""

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
        img = decode_image(image_bytes.data, max_pixels=self.max_pixels, min_side=self.min_side)
        h, w = img.shape[:2]
        out, box = resize_center_crop(img, self.resolution)
        mask = np.zeros(out.shape[:2], np.uint8)
        has_mask = False
        if row.get("mask_path"):
            if mask_bytes is None or not mask_bytes.ok:
                raise SampleError("fetch", f"dataset mask: {mask_bytes.reason if mask_bytes else 'not read'}")
            encoded = mask_bytes.data
            try:
                mw, mh = image_size(encoded)  # header only: the size checks come before a full decode
            except ValueError as exc:
                raise SampleError("decode", f"dataset mask unreadable: {exc}") from None
            if mw * mh > self.max_pixels:
                raise SampleError("decode", f"dataset mask {mw}x{mh}={mw * mh} pixels is over the limit of "
                                            f"{self.max_pixels} (max_pixels)")
            if (mh, mw) != (h, w):
                raise SampleError("decode", f"dataset mask size {mw}x{mh} != image {w}x{h}")
            try:
                labels = decode_png(encoded)
            except ValueError as exc:
                raise SampleError("decode", f"dataset mask unreadable: {exc}") from None
            # threshold at the stored bit depth, then resize the {0,1} mask (a uint8 cast of 16-bit labels wraps)
            binary = dataset_mask_from_labels(labels, row.get("mask_kind") or "binary")
            mask, _ = resize_center_crop(binary, self.resolution, nearest=True)
            has_mask = True
        return out, mask, has_mask, (w, h), box.as_list()

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

"""Common machinery of the per-sample stages.

A stage is a picklable callable class: the model is loaded once in ``__init__``; ``__call__``
maps a batch (see :mod:`triplets.batch`) to the same batch with new columns. Only healthy
rows are processed, in model calls of at most :attr:`Stage.batch_size` rows (per-stage batch
sizes). If a whole-batch call raises (a bad sample, an OOM), the stage retries
row by row so that one bad sample never takes its neighbours down; the row that still fails
gets a per-sample reason.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from triplets.batch import ensure_status, fail, healthy, put, take
from triplets.errors import SampleError

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _rebuild(cls, args: tuple, kwargs: dict) -> Stage:
    return cls(*args, **kwargs)


class Stage:
    """Base class: subclasses set :attr:`name`, implement :meth:`process` and :meth:`empty`.

    Stages pickle by their constructor arguments (the models are rebuilt, loaded once, on the
    receiving side), so a stage can be shipped to a Ray worker or a subprocess even after
    libraries attached unpicklable hooks to its models.

    :meth:`process` gets the healthy rows and returns ``(columns, failures)`` where ``columns``
    maps column names to arrays over those rows and ``failures`` maps a row position (within
    the healthy subset) to a reason (or to ``(stage, reason)`` when the failure belongs to another step, as the
    load stage's ``fetch`` failures).
    """

    name = "stage"
    #: Rows per model call (``None``: the whole batch). Set by the builder from ``<stage>.batch_size``.
    batch_size: int | None = None
    #: Threads for per-image host work (NumPy/OpenCV between model calls), set by the builder; ``None``: inline.
    host_pool = None

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj._init_args = (args, kwargs)
        return obj

    def __reduce__(self):
        return _rebuild, (self.__class__, *self._init_args)

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def host_map(self, fn, *iterables) -> list:
        """``list(map(fn, *iterables))``, on :attr:`host_pool`'s threads when there is one (same results, in order):
        per-image host work of a batch runs in parallel instead of one image after the other on the model thread
        while the device waits (NumPy and OpenCV release the GIL)."""
        if self.host_pool is None:
            return list(map(fn, *iterables))
        return list(self.host_pool.map(fn, *iterables))

    def empty(self, batch: dict) -> dict:
        """Zero-filled output columns for a batch with no healthy row (keeps schemas stable)."""
        return {}

    def __call__(self, batch: dict) -> dict:
        batch = ensure_status(dict(batch))
        idx = healthy(batch)
        start = time.perf_counter()
        step = self.batch_size or max(1, len(idx))
        for lo in range(0, len(idx), step):
            self._apply_isolated(batch, idx[lo:lo + step])
        for col, arr in self.empty(batch).items():
            batch.setdefault(col, arr)
        per_sample = (time.perf_counter() - start) / max(1, len(idx))
        put(batch, f"time_{self.name}", np.arange(len(batch["key"])), np.full(len(batch["key"]), per_sample))
        return batch

    def _apply_isolated(self, batch: dict, idx: np.ndarray) -> None:
        """:meth:`_apply` on rows ``idx``; when the call raises, row by row so only the culprit fails."""
        try:
            self._apply(batch, idx)
        except Exception as exc:  # noqa: BLE001 - isolate the culprit row by row
            if len(idx) == 1:
                self._fail_row(batch, idx[0], exc)
                return
            log.debug("%s: batch of %d failed (%s); retrying row by row", self.name, len(idx), exc)
            for i in idx:
                try:
                    self._apply(batch, np.array([i]))
                except Exception as row_exc:  # noqa: BLE001
                    self._fail_row(batch, i, row_exc)

    def _apply(self, batch: dict, idx: np.ndarray) -> None:
        columns, failures = self.process(take(batch, idx))
        for col, values in columns.items():
            put(batch, col, idx, values)
        for pos, reason in failures.items():  # a reason, or (stage, reason) for a failure of an earlier step
            fail(batch, idx[pos], *(reason if isinstance(reason, tuple) else (self.name, reason)))

    def _fail_row(self, batch: dict, i: int, exc: Exception) -> None:
        if isinstance(exc, SampleError):
            fail(batch, i, exc.stage, exc.reason)
        else:
            log.warning("%s failed on %s: %s: %s", self.name, batch["key"][i], type(exc).__name__, exc)
            fail(batch, i, self.name, f"{type(exc).__name__}: {exc}")

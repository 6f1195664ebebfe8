"""The batch contract shared by every stage.

A batch is a ``dict`` of equally long columns (numpy arrays or lists), one row per sample:

* ``key`` — sample keys (str); ``source`` — source ids; ``caption`` — captions.
* ``error`` / ``error_stage`` — object arrays of str, ``""`` while the sample is healthy.
  A stage only processes healthy rows and marks the rows it cannot process; failed rows keep
  zero-filled outputs so every column stays rectangular (Ray Data, plain loops and tests see
  the same shapes).
* ``time_<stage>`` — float64 seconds spent per sample in that stage.
"""

from __future__ import annotations

import numpy as np


def batch_len(batch: dict) -> int:
    return len(batch["key"])


def ensure_status(batch: dict) -> dict:
    """Add empty ``error``/``error_stage`` columns when missing (returns the same dict)."""
    n = batch_len(batch)
    for col in ("error", "error_stage"):
        if col not in batch:
            batch[col] = np.array([""] * n, dtype=object)
        else:
            batch[col] = np.asarray(batch[col], dtype=object)
    return batch


def healthy(batch: dict) -> np.ndarray:
    """Indices of rows that have not failed."""
    return np.flatnonzero(np.asarray([e == "" for e in batch["error"]], dtype=bool))


def fail(batch: dict, index: int, stage: str, reason: str) -> None:
    """Mark row ``index`` as failed in ``stage`` (the first failure wins)."""
    if batch["error"][index] == "":
        batch["error"][index] = reason
        batch["error_stage"][index] = stage


def take(batch: dict, idx: np.ndarray) -> dict:
    """Rows ``idx`` of every column (lists become lists, arrays arrays)."""
    out = {}
    for k, v in batch.items():
        out[k] = [v[i] for i in idx] if isinstance(v, list) else np.asarray(v)[idx]
    return out


def put(batch: dict, column: str, idx: np.ndarray, values: np.ndarray) -> None:
    """Write ``values`` into rows ``idx`` of ``column``, creating a zero-filled column first."""
    values = np.asarray(values)
    if column not in batch:
        batch[column] = np.zeros((batch_len(batch),) + values.shape[1:], dtype=values.dtype)
    batch[column][idx] = values

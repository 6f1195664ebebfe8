"""Per-sample failures and the user errors the data layer raises (defined in :mod:`cnc.base.errors`)."""

from __future__ import annotations

from cnc.base.errors import ModelUnavailableError, SampleError, UserError

__all__ = ["ModelUnavailableError", "SampleError", "UserError"]

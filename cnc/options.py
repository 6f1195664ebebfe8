"""Conventions shared by every command's options (one name per meaning, across ``cnc`` sub-commands).

* ``--output/-o``: the output location of the command (a folder, a URL; for ``cnc submit``/``render-job`` the job's
  output as the cluster sees it); ``--out`` is a hidden, deprecated alias where it existed.
* ``--workers``: parallel workers of the command (Ray Train workers in ``cnc train``; ``--ray-workers`` is a hidden
  alias); ``--address``: the Ray cluster (``--ray-address`` a hidden alias in ``cnc train``).
* ``--json``: one machine-readable document on stdout; logs go to stderr.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from cnc.base.errors import UserError

T = TypeVar("T")
log = logging.getLogger("cnc")


def deprecated_alias(value: T, alias_value: T | None, alias: str, name: str, default: T | None = None) -> T:
    """Merge a hidden deprecated option into its new name (the alias wins only when the new one was not given).

    Args:
        value: the value of the new option (``name``).
        alias_value: the value of the deprecated option (``None`` when not given).
        alias / name: the option names, for the warning (``"--out"``, ``"--output"``).
        default: the new option's default (``value == default`` means it was not given).
    """
    if alias_value is None:
        return value
    log.warning("%s is deprecated; use %s", alias, name)
    if value is not None and value != default and value != alias_value:
        raise UserError(f"{alias} and {name} name the same option; give only {name}")
    return alias_value

"""Conventions shared by every command's options (one name per meaning, across ``cnc`` sub-commands).

* ``--output/-o``: the output location of the command (a folder, a URL; for ``cnc submit``/``render-job`` the job's
  output as the cluster sees it); ``--out`` is a hidden, deprecated alias where it existed.
* ``--workers``: parallel workers of the command (Ray Train workers in ``cnc train``; ``--ray-workers`` is a hidden
  alias); ``--address``: the Ray cluster (``--ray-address`` a hidden alias in ``cnc train``).
* ``--json``: one machine-readable document on stdout; logs go to stderr.
* ``--n/-n``: how many samples or images (``inspect``, ``sample``, ``eval``; ``--num-images`` a hidden alias in
  ``cnc sample``); ``--clip-model``: the CLIP model (``--image-encoder`` a hidden alias in ``cnc sample``);
  ``--config/-c`` and ``--set key=value``: the typed config and its overrides.
* Fixed choices are enums (:func:`choice_enum`): typer validates them, lists them in ``--help`` and completes them.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TypeVar, get_args

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


def choice_enum(name: str, values) -> type[Enum]:
    """A ``str`` enum of fixed choices for a typer option (validated with a one-line usage error, listed in
    ``--help``, completed by the shell). Members are named and valued by the choice (``InputFormat("coco")``)."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


def literal_choices(model, field: str) -> tuple[str, ...]:
    """The values of a pydantic ``Literal[...]`` field (one source for a config key and the option setting it)."""
    return tuple(get_args(model.model_fields[field].annotation))


def value_of(choice) -> str | None:
    """An enum option's value (``None`` stays ``None``)."""
    return None if choice is None else getattr(choice, "value", choice)


#: ``--weights`` of ``cnc sample`` / ``eval`` / ``export``.
Weights = choice_enum("Weights", ("ema", "raw"))

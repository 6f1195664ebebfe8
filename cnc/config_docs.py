"""Every config key, from the pydantic models themselves: ``cnc config docs`` and ``docs/config.md``.

:func:`config_keys` walks a config model (nested sections included) and yields one :class:`KeyDoc` per leaf key with
its type, default and the field's ``description``; :func:`render_markdown` makes the tables of ``docs/config.md``
(regenerate it with ``cnc config docs --output docs/config.md``; a test checks it is complete and current).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from triplets.config import BuildConfig


@dataclass(frozen=True)
class KeyDoc:
    """One config key: dotted ``key``, rendered ``type``, ``default`` (YAML-ish text) and ``description``."""

    key: str
    type: str
    default: str
    description: str


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def type_name(tp) -> str:
    """A readable type: ``int``, ``auto | folder | coco``, ``str or null``, ``list[str]``..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _default(field) -> str:
    value = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory taking the validated data
            return "(computed)"
    if value is PydanticUndefined:
        return "(required)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return str(value)


def _section_of(tp) -> type[BaseModel] | None:
    """The nested config model of a field type (``X`` or ``X | None``), else ``None``."""
    if _is_model(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and _is_model(args[0]) else None


def config_keys(model: type[BaseModel], prefix: str = "") -> Iterator[KeyDoc]:
    """Every leaf key of ``model`` (depth first, in declaration order)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section_of(field.annotation)
        if section is not None:
            yield from config_keys(section, key + ".")
            continue
        yield KeyDoc(key, type_name(field.annotation), _default(field), " ".join((field.description or "").split()))


def config_models() -> dict[str, type[BaseModel]]:
    """The documented configs: ``build`` (``cnc build``, ``cnc score``) and ``train`` (``cnc train``)."""
    from cnc_model.training.config import TrainConfig  # numpy (through triplets.quality): heavy

    return {"build": BuildConfig, "train": TrainConfig}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(kinds: list[str] | None = None) -> str:
    """``docs/config.md``: one table per config kind (key, type, default, description)."""
    models = config_models()
    lines = ["# Config reference", "",
             "Every key of the build config (`cnc build`, `cnc score`; `configs/build/*.yaml`) and of the training "
             "config (`cnc train`; `configs/train/*.yaml`), generated from the pydantic models "
             "(`cnc config docs --output docs/config.md`). Set any key in the YAML file or with "
             "`--set key.sub=value`; unknown keys are errors. `cnc config show NAME` prints a shipped config.", ""]
    for kind in kinds or list(models):
        model = models[kind]
        doc = " ".join((model.__doc__ or "").split())
        lines += [f"## {kind}: `{model.__module__}.{model.__name__}`", "", doc, "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{k.key}` | {_cell(k.type)} | `{_cell(k.default)}` | {_cell(k.description) or '—'} |"
                  for k in config_keys(model)]
        lines.append("")
    return "\n".join(lines)


__all__ = ["KeyDoc", "config_keys", "config_models", "render_markdown", "type_name"]

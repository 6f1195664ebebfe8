"""YAML → typed (pydantic) configuration, with ``--set key.sub=value`` overrides.

Configs are parsed and validated once at the entry point, then saved beside the outputs
(:func:`save_config`). Unknown keys are errors, so typos never pass silently.

The shipped configs are package data (``cnc/configs/{build,train}/*.yaml``; the checkout's top-level ``configs/``
links there) and can be named instead of given as a path: ``default``, ``tiny``, ``build/tiny``, ``train/local``
(:func:`resolve_config_path`; a bare name means the kind of the command, build or train).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError

from cnc.base.errors import UserError
from cnc.base.hashing import json_sha256
from cnc.base.location import Location, resolve

T = TypeVar("T", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A config file or override is invalid (message names the key)."""


#: A seed every consumer accepts: ``numpy.random.seed`` (accelerate's ``set_seed``) takes 0 .. 2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="random seed, 0 .. 2**32 - 1")]

# Bounds shared by every config and command that takes these settings (README "Exit codes", docs/build.md). A value
# outside them is refused at parse time (exit 2) instead of failing every sample later or committing garbage.
#: Largest image side a build or a training run accepts: a 4096 px crop already needs ~0.2 GB per field in float32
#: and its Stable Diffusion latents (512x512) far more than the 64x64 the SD-1.5 models are trained on.
MAX_RESOLUTION = 4096
#: Most denoising steps of a sampler (DDIM/PNDM schedules have 1000 training timesteps).
MAX_STEPS = 1000
#: Largest classifier-free guidance scale (the paper and the reference use 7.5-10; beyond ~30 images saturate).
MAX_GUIDANCE = 100.0
#: Pydantic setting of every config model: NaN and ±inf are refused for every float field.
FINITE_FLOATS = {"allow_inf_nan": False}

GuidanceScale = Annotated[float, Field(ge=0, le=MAX_GUIDANCE, description=f"classifier-free guidance, 0 .. "
                                                                          f"{MAX_GUIDANCE:g}")]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS, description=f"denoising steps, 1 .. {MAX_STEPS}")]


def parse_override(item: str) -> tuple[list[str], object]:
    """``"a.b=3"`` → ``(["a", "b"], 3)``.

    The value is parsed as YAML (numbers, bools, lists, null, ``{...}`` mappings); text such as ``a: b`` stays a string.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (dotted keys for nesting)")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, dict) and not value.lstrip().startswith("{"):
        parsed = value  # "a: b" is a string with a colon, not a mapping
    return key.strip().split("."), parsed


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply dotted ``key=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def packaged_configs_dir() -> Path:
    """The folder of the shipped configs (inside the installed ``cnc`` package)."""
    return Path(str(resources.files("cnc") / "configs"))


def packaged_config_names() -> list[str]:
    """``["build/default", "build/tiny", "train/global", ...]``."""
    root = packaged_configs_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.yaml"))


def resolve_config_path(name: str | Path, kind: str | None = None) -> Path:
    """A config file path, or the shipped config ``name`` (``tiny``, ``build/tiny``, ``train/local``, with or
    without ``.yaml``; a bare name is looked up under ``kind``).

    Raises:
        ConfigError: neither a file nor a shipped config (the message lists the shipped names).
    """
    p = Path(name).expanduser()
    if p.is_file():
        return p
    stem = str(name).removesuffix(".yaml")
    root = packaged_configs_dir()
    candidates = [root / f"{stem}.yaml"] + ([root / kind / f"{stem}.yaml"] if kind and "/" not in stem else [])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name} (not a file, and not a shipped config: "
                      f"{', '.join(packaged_config_names())})")


def load_config(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                options: dict[str, str] | None = None) -> T:
    """Read YAML ``path`` (optional; a file or a shipped config name), apply overrides, validate into ``model``.

    Args:
        options: dotted key → the command-line option that set it (``{"ray.num_workers": "--workers"}``), so an
            invalid value blames that option; other overrides are blamed as ``--set key=value``, the rest on the
            file.

    Raises:
        ConfigError: one line per problem, each naming what to fix (the file and key, ``--set key=value`` or the
            option), the key and the problem.
    """
    data: dict = {}
    if path is not None:
        p = resolve_config_path(path, getattr(model, "CONFIG_KIND", None))
        try:
            loaded = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
        except OSError as exc:
            raise ConfigError(f"{p}: unreadable ({exc.strerror or exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded
    apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        given = {}
        for item in overrides or []:
            key_path, _ = parse_override(item)
            given[".".join(key_path)] = item
        lines = []
        for e in exc.errors():
            key = ".".join(str(x) for x in e["loc"])
            culprit = next((k for k in sorted(given, key=len, reverse=True)
                            if key == k or key.startswith(k + ".")), None)
            if culprit is not None:
                value = given[culprit].split("=", 1)[1]
                where = (f"{options[culprit]} {value}" if options and culprit in options
                         else f"--set {given[culprit]}")
                lines.append(f"invalid {where}: {key}: {e['msg']}")
            else:
                lines.append(f"invalid config{f' {path}' if path else ''}: {key}: {e['msg']}")
        raise ConfigError("\n".join(lines)) from None


def config_dict(cfg: BaseModel) -> dict:
    """JSON-safe dict of a config."""
    return json.loads(cfg.model_dump_json())


def config_hash(cfg: BaseModel | dict) -> str:
    """Stable sha256 of a config's canonical JSON (first 16 hex)."""
    return json_sha256(config_dict(cfg) if isinstance(cfg, BaseModel) else cfg)[:16]


def save_config(cfg: BaseModel, path: str | Path | Location) -> Location:
    """Write the resolved config as YAML (atomically; a local path or an fsspec URL) and return its location."""
    return resolve(path).write_bytes(yaml.safe_dump(config_dict(cfg), sort_keys=False).encode())

"""Pipelines named on the command line (``cnc sample``, ``cnc eval``): described and loaded with one-line user errors,
and the reference demo's prompt defaults. Below every CLI of ``cnc_model`` (they all import it, it imports none)."""

from __future__ import annotations

from cnc.base.errors import ModelUnavailableError, UserError, one_line
from cnc.base.location import resolve
from cnc.hub import resolve_all
from cnc_model.loading import NotAPipelineError, Source, describe, load_pipeline

#: ``--dtype`` of ``cnc sample`` / ``cnc eval``.
DTYPES = ("float32", "float16", "bfloat16")


def pipeline_dtype(name: str):
    """The torch dtype of ``--dtype NAME`` (one of :data:`DTYPES`; else a :class:`UserError`)."""
    import torch  # lazy: torch is heavy and `cnc --help` stays fast

    if name not in DTYPES:
        raise UserError(f"--dtype takes {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def sampling_prompts(negative_prompt: str | None, prompt_suffix: str | None, reference: bool) -> tuple[str, str]:
    """Resolve the negative prompt and prompt suffix: explicit values win, else the reference demo's (or "")."""
    from cnc_model.pipeline_cnc import REFERENCE_NEGATIVE_PROMPT, REFERENCE_PROMPT_SUFFIX  # diffusers: heavy

    if negative_prompt is None:
        negative_prompt = REFERENCE_NEGATIVE_PROMPT if reference else ""
    if prompt_suffix is None:
        prompt_suffix = REFERENCE_PROMPT_SUFFIX if reference else ""
    return negative_prompt, prompt_suffix


def describe_source(path: str, option: str = "PIPELINE", weights: str | None = None):
    """:func:`cnc_model.loading.describe` (cheap: no model is loaded); failures are a :class:`UserError` (one
    line)."""
    if not resolve(path).exists():
        raise UserError(f"{option} {path} does not exist")
    try:
        return describe(path, weights)
    except (NotAPipelineError, ModelUnavailableError) as err:
        raise UserError(str(err).splitlines()[0]) from None


def load_source(path, option: str = "PIPELINE", weights: str | None = None):
    """``(Source, CnCPipeline)`` of ``path`` (a folder, or a :class:`~cnc_model.loading.Source` already described)
    with the selected ``weights``; failures are a :class:`UserError` (one line)."""
    source = path if isinstance(path, Source) else describe_source(path, option, weights)
    try:
        return source, load_pipeline(source)
    except (NotAPipelineError, ModelUnavailableError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    except Exception as err:  # noqa: BLE001 - a user-given folder that does not load is one line, never a traceback
        raise UserError(f"{option} {source.path} does not load: {one_line(err)}") from None


def base_model_problems(source) -> list[str]:
    """Why the base model of a run or checkpoint ``source`` cannot load, one line each (checked up front with
    :func:`cnc.hub.resolve_all`, in seconds: ``cnc sample`` and ``cnc eval`` report it beside every other missing
    model before anything loads); a pipeline folder holds its base parts (checked by
    :func:`cnc_model.loading.pipeline_problems`)."""
    if source.kind == "pipeline":
        return []
    key = "model.pretrained_model_name_or_path"
    try:
        resolve_all({key: source.config.model.pretrained_model_name_or_path},
                    seed=getattr(source.config, "seed", 0) or 0)
    except ModelUnavailableError as err:
        return str(err).splitlines()
    return []

"""Load a :class:`~cnc_model.pipeline_cnc.CnCPipeline` from any output of ``cnc train``, and export it.

Three kinds of folders are accepted alike (by ``cnc sample``, ``cnc eval`` and ``cnc export``):

- a **pipeline folder** (``model_index.json``: written by ``CnCPipeline.save_pretrained``, ``cnc export`` or
  ``cnc convert-reference --base-model``);
- a **run folder** (``OUTPUT`` of ``cnc train``: ``train_config.yaml`` + the final ``local_fuser/`` /
  ``global_fuser/``);
- a **checkpoint folder** (``OUTPUT/checkpoint-N``: ``trainer_state.json`` + the fusers at step N; the run's
  ``train_config.yaml`` is read from the parent folder).

Each may be a local path or an object-store URL (``s3://bucket/ckpt/local``): the files sampling needs (configs and
fuser weights; never optimizer states) are downloaded once into a local cache folder first.

For runs and checkpoints the frozen parts come from the run's ``model.pretrained_model_name_or_path`` (a diffusers SD
1.5 folder / hub id, or ``tiny``: the same seeded tiny models the run trained with) and the sampler is DDIM with the
reference settings. Only the fusers the stage trained are loaded: a ``local`` run samples with its local fuser and the
77 text tokens, a ``global`` run with its global fuser and no depth residuals.

**Weights** (``--weights ema|raw`` of ``cnc sample`` / ``cnc eval`` / ``cnc export``): with ``train.use_ema`` a
checkpoint holds the raw fusers (``local_fuser/``) and their EMA copies (``ema_local_fuser/``), and the run's final
fusers *are* the EMA weights. A checkpoint therefore loads its EMA copies by default when it has them (so a checkpoint
and the final output of one run are comparable), its raw weights otherwise; ``raw`` takes the raw weights. A run
folder holds one set (EMA with ``train.use_ema``, else raw), and so does a pipeline folder (``cnc_export.json`` records
which); asking such a folder for the other set is a one-line error. :attr:`Source.weights` says what is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from cnc.base import jsonio
from cnc.base.errors import ModelUnavailableError, UserError
from cnc.base.location import Location, resolve
from cnc.config import config_dict
from cnc_model.card import write_pipeline_files
from cnc_model.training import checkpointing as ckpt
from cnc_model.training.checkpointing import safetensors_problem
from cnc_model.training.run_storage import RunStorage

logger = logging.getLogger(__name__)
FUSERS = ("local_fuser", "global_fuser")
MODEL_CARD = "README.md"
EXPORT_META = "cnc_export.json"
#: Choices of ``--weights``: the EMA copies (``ema_<name>/``) or the raw optimizer weights (``<name>/``).
WEIGHTS = ("ema", "raw")
EMA_PREFIX = "ema_"
#: Help of ``--weights`` (``cnc sample`` / ``cnc eval`` / ``cnc export``).
WEIGHTS_HELP = ("ema or raw: a checkpoint-N folder's EMA copies (ema_<fuser>/, written with train.use_ema) or its raw "
                "weights. Default: EMA where the checkpoint has it (as the run's final fusers), else raw. A run or "
                "pipeline folder holds one set; asking it for the other is an error.")


class NotAPipelineError(UserError, ValueError):
    """The folder is none of: pipeline folder, run folder, checkpoint folder (message: one line)."""


class WeightsUnavailableError(NotAPipelineError):
    """The folder does not hold the weights asked for with ``--weights`` (message: one line)."""


@dataclass
class Source:
    """What a folder holds.

    Attributes:
        kind: ``pipeline``, ``run`` or ``checkpoint``.
        path: the folder.
        config: the run's train config (``None`` for a pipeline folder).
        step: optimizer steps of the weights (``None`` when unknown).
        weights: which fuser weights are loaded: ``ema`` or ``raw`` (``None``: a pipeline folder that does not
            record it, e.g. one written by ``cnc convert-reference``).
        ema_decay: ``train.ema_decay`` of the run when ``weights == "ema"``.
    """

    kind: str
    path: Path
    config: object | None = None
    step: int | None = None
    weights: str | None = None
    ema_decay: float | None = None
    provenance: dict | None = None
    meta: dict | None = None

    def fuser_folder(self, name: str) -> Path:
        """The folder of fuser ``name`` holding the selected weights (``ema_<name>/`` for a checkpoint's EMA)."""
        if self.kind == "checkpoint" and self.weights == "ema":
            return self.path / f"{EMA_PREFIX}{name}"
        return self.path / name

    def conditions_record(self) -> dict | None:
        """``{"builds", "sampling", "notes"}`` of the training shards' build settings
        (:func:`triplets.conditions.training_conditions`): the run's provenance, or a pipeline folder's
        ``cnc_export.json``; ``None`` when not recorded."""
        if self.kind == "pipeline":
            return (self.meta or {}).get("conditions")
        return (self.provenance or {}).get("conditions")

    def conditions(self):
        """``(ConditionSettings | None, notes)``: the settings this model's conditions must be made with."""
        from triplets.conditions import settings_from

        record = self.conditions_record() or {}
        return settings_from(record.get("sampling")), list(record.get("notes") or [])

    def unet_record(self) -> dict | None:
        """Identity record of the frozen UNet the fusers were trained against when it is not the base model's
        ``unet/`` (``model.unet`` of a run; a pipeline folder's ``cnc_export.json`` ``unet``), else ``None``."""
        if self.kind == "pipeline":
            return (self.meta or {}).get("unet")
        return ((self.provenance or {}).get("models") or {}).get("model.unet")


#: Files of a checkpoint that sampling never needs (training state only).
_TRAINING_STATE = ("optimizer", "scheduler", "scaler", "random_states", "data_state")


def _download_tree(src: Location, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy every file below ``src`` into ``dest`` (files already there with the same size are kept)."""
    base = src.path.rstrip("/")
    for path, info in src.fs.find(base, detail=True).items():
        rel = path[len(base) + 1:]
        if not rel or rel.rsplit("/", 1)[-1].startswith(skip):
            continue
        target = dest / rel
        if not (target.is_file() and target.stat().st_size == info.get("size")):
            target.parent.mkdir(parents=True, exist_ok=True)
            src.fs.get_file(path, str(target))


def localize(path: str | Path) -> Path:
    """A local folder holding what sampling needs from ``path`` (itself when local; a cached download of a URL)."""
    loc = resolve(str(path))
    if loc.is_local:
        return loc.local_path()
    root = Path(tempfile.gettempdir()) / "cnc-remote" / hashlib.sha256(loc.url.encode()).hexdigest()[:16]
    names = loc.list()
    if "model_index.json" in names:  # a pipeline folder: all of it
        _download_tree(loc, root)
        return root
    if ckpt.TRAINER_STATE in names:  # a checkpoint: its fusers + the run's config beside it
        run = root / "run"
        loc.parent.child("train_config.yaml").download(run / "train_config.yaml")
        _download_tree(loc, run / loc.name, skip=_TRAINING_STATE)
        return run / loc.name
    if "train_config.yaml" in names:  # a run folder: config, final fusers, the newest checkpoint's state
        loc.child("train_config.yaml").download(root / "train_config.yaml")
        for name in FUSERS:
            if name in names:
                _download_tree(loc.child(name), root / name)

        done = RunStorage(loc.url).remote_checkpoints()
        if done:
            loc.child(done[-1], ckpt.TRAINER_STATE).download(root / done[-1] / ckpt.TRAINER_STATE)
        return root
    raise NotAPipelineError(f"{loc.url} is not a CnC pipeline folder (model_index.json), a cnc train output folder "
                            f"(train_config.yaml) or a checkpoint-N folder")


def _trained(cfg) -> list[str]:
    return [n for n, on in (("local_fuser", cfg.trains_local), ("global_fuser", cfg.trains_global)) if on]


def _select_weights(source: Source, requested: str | None) -> Source:
    """Set ``source.weights`` from ``requested`` (``ema``, ``raw`` or ``None`` = the folder's default).

    Raises:
        WeightsUnavailableError: the folder does not hold the requested weights (one line, with what to pass).
    """
    if requested is not None and requested not in WEIGHTS:
        raise WeightsUnavailableError(f"--weights takes {' or '.join(WEIGHTS)}, got {requested!r}")
    where = f"{source.kind} folder {source.path}"
    if source.kind == "pipeline":
        recorded = source.meta or {}
        held = recorded.get("weights")
        if isinstance(recorded.get("step"), int):
            source.step = recorded["step"]  # an export knows the training step of its weights
        if requested is not None and requested != held:
            raise WeightsUnavailableError(
                f"{where} holds {held + ' weights' if held else 'weights of unrecorded kind'}, fixed at export; "
                f"--weights {requested} selects between the EMA and raw weights of a cnc train run or checkpoint "
                f"folder")
        source.weights = held
        return source
    cfg = source.config
    if source.kind == "checkpoint":
        has_ema = all((source.path / f"{EMA_PREFIX}{name}" / "config.json").is_file() for name in _trained(cfg))
        if requested == "ema" and not has_ema:
            raise WeightsUnavailableError(f"{where} has no EMA weights ({EMA_PREFIX}<fuser>/; the run trained "
                                          f"without train.use_ema): use --weights raw")
        source.weights = requested or ("ema" if has_ema else "raw")
    else:  # a run folder: its final fusers are the EMA weights with train.use_ema, the raw ones otherwise
        held = "ema" if cfg.train.use_ema else "raw"
        if requested is not None and requested != held:
            hint = ("pass one of its checkpoint-N folders with --weights raw" if held == "ema"
                    else "it trained without train.use_ema: use --weights raw")
            raise WeightsUnavailableError(f"{where} holds only the {held} weights of the run; {hint}")
        source.weights = held
    if source.weights == "ema":
        source.ema_decay = cfg.train.ema_decay
    return source


#: The file a pipeline component's folder must hold, by the class named in ``model_index.json`` (others:
#: ``config.json``, the diffusers/transformers model convention).
_COMPONENT_FILES = (("Scheduler", ("scheduler_config.json",)), ("Tokenizer", ("tokenizer_config.json",)),
                    ("ImageProcessor", ("preprocessor_config.json",)),
                    ("FeatureExtractor", ("preprocessor_config.json",)))


def pipeline_problems(root: Path) -> list[str]:
    """Why the pipeline folder ``root`` cannot be loaded, one line each (empty: every component is there).

    Every component named in ``model_index.json`` needs its folder and its config file, and a model component its
    weights; safetensors files must be complete (headers only are read: cheap). ``from_pretrained`` would otherwise
    name the pipeline root instead of the missing folder, or fail with an unrelated error (a missing tokenizer gives
    ``OverflowError``).
    """

    try:
        index = jsonio.loads((root / "model_index.json").read_bytes(), what="model_index.json")
    except (OSError, ValueError) as exc:
        return [f"{root / 'model_index.json'} is unreadable ({exc})"]
    if not isinstance(index, dict):
        return [f"{root / 'model_index.json'} is not a JSON object"]
    problems = []
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue  # metadata, or an optional component saved as null
        folder, cls = root / name, str(spec[1])
        if not folder.is_dir():
            problems.append(f"component {name} ({cls}) is missing: no folder {folder}")
            continue
        need = next((files for marker, files in _COMPONENT_FILES if marker in cls), ("config.json",))
        problems += [f"component {name} ({cls}) is incomplete: no {folder / f}" for f in need
                     if not (folder / f).is_file()]
        if need == ("config.json",):
            weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
            if not weights:
                problems.append(f"component {name} ({cls}) has no weights in {folder}")
            problems += [p for p in map(safetensors_problem, folder.glob("*.safetensors")) if p]
    return problems


def describe(path: str | Path, weights: str | None = None) -> Source:
    """Classify ``path`` (see the module docstring) and select its weights; a URL is downloaded first
    (:func:`localize`).

    Args:
        weights: ``ema``, ``raw`` or ``None`` (the folder's default: a checkpoint's EMA copies where present).

    Raises:
        NotAPipelineError: when it is none of the three kinds, or a run has no final weights yet.
        WeightsUnavailableError: the folder does not hold the ``weights`` asked for.
    """
    from cnc_model.training.config import load_train_config
    from cnc_model.training.provenance import read_provenance

    p = localize(path)
    if (p / "model_index.json").is_file():
        problems = pipeline_problems(p)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise NotAPipelineError(f"pipeline folder {p}: {problems[0]}{more}")
        meta = None
        if (p / EXPORT_META).is_file():  # written by cnc export / convert-reference; a user's folder: bounded
            try:
                meta = jsonio.loads((p / EXPORT_META).read_bytes(), what=EXPORT_META)
            except (OSError, ValueError) as exc:
                raise NotAPipelineError(f"pipeline folder {p}: {p / EXPORT_META} is unreadable ({exc})") from None
        return _select_weights(Source("pipeline", p, meta=meta), weights)
    if (p / ckpt.TRAINER_STATE).is_file() and (p.parent / "train_config.yaml").is_file():
        state = ckpt.read_json(p / ckpt.TRAINER_STATE)
        source = Source("checkpoint", p, load_train_config(p.parent / "train_config.yaml"), int(state["global_step"]),
                        provenance=read_provenance(p))
        return _select_weights(source, weights)
    if (p / "train_config.yaml").is_file():
        cfg = load_train_config(p / "train_config.yaml")
        if not any((p / name / "config.json").is_file() for name in FUSERS):
            latest = ckpt.find_latest_checkpoint(p)
            hint = f"; sample a checkpoint instead, e.g. {latest}" if latest else ""
            raise NotAPipelineError(f"run folder {p} has no final fuser weights (training unfinished?){hint}")
        latest = ckpt.find_latest_checkpoint(p)
        step = int(ckpt.read_json(latest / ckpt.TRAINER_STATE)["global_step"]) if latest else None
        return _select_weights(Source("run", p, cfg, step, provenance=read_provenance(p)), weights)
    raise NotAPipelineError(f"{p} is not a CnC pipeline folder (model_index.json), a cnc train output folder "
                            f"(train_config.yaml) or a checkpoint-N folder")


def _sampling_scheduler(training_scheduler):
    """DDIM with the reference's inference settings (leading spacing, steps_offset 1, no alpha_to_one, η from call)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(training_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                     steps_offset=1, timestep_spacing="leading")


@contextlib.contextmanager
def _quiet_config_warnings():
    """An ``ema_<name>/`` config also holds the EMA settings (``decay``, ``optimization_step``...), which
    ``from_pretrained`` reports as unexpected keys and ignores: silence that one warning."""
    from diffusers.utils import logging as diffusers_logging

    config_logger = diffusers_logging.get_logger("diffusers.configuration_utils")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        config_logger.setLevel(level)


def _load_fusers(source: Source) -> dict:
    from cnc_model.models.global_fuser import GlobalFuser
    from cnc_model.models.local_fuser import LocalFuser

    cfg = source.config
    wanted = _trained(cfg)
    fusers = {}
    for name, cls in (("local_fuser", LocalFuser), ("global_fuser", GlobalFuser)):
        if name not in wanted:
            fusers[name] = None
            continue
        folder = source.fuser_folder(name)
        if not (folder / "config.json").is_file():
            raise NotAPipelineError(f"{source.kind} folder {source.path} of stage {cfg.stage!r} has no "
                                    f"{folder.name}/")
        damaged = [p for p in map(safetensors_problem, sorted(folder.glob("*.safetensors"))) if p]
        if damaged:
            raise NotAPipelineError(damaged[0])
        with _quiet_config_warnings():
            fusers[name] = cls.from_pretrained(folder).eval()
    return fusers


def load_pipeline(path: str | Path | Source, *, weights: str | None = None, torch_dtype=None):
    """A :class:`~cnc_model.pipeline_cnc.CnCPipeline` from a pipeline, run or checkpoint folder.

    Args:
        path: the folder (local or URL), or a :class:`Source` from :func:`describe` (``weights`` is then ignored).
        weights: ``ema``, ``raw`` or ``None`` (default: a checkpoint's EMA copies where present; module docstring).

    Raises:
        NotAPipelineError: the folder is not loadable (one line).
        WeightsUnavailableError: the folder does not hold the ``weights`` asked for (one line).
        ModelUnavailableError: the run's base model is missing (one line naming
            ``model.pretrained_model_name_or_path``).
    """
    from cnc_model.pipeline_cnc import CnCPipeline
    from cnc_model.training.components import _load_base

    source = path if isinstance(path, Source) else describe(path, weights)
    if source.kind == "pipeline":
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        pipe = CnCPipeline.from_pretrained(source.path, **kwargs)
        attention = (source.meta or {}).get("attention") or {}
        pipe.set_attention(resize_mode=attention.get("resize_mode", "reference"),
                           fp32_logits=bool(attention.get("fp32_logits", False)))
        return pipe
    base = _load_base(source.config)  # tiny: the run's seeded models; else from_pretrained (fail fast, one line)
    scheduler = _sampling_scheduler(base.pop("noise_scheduler"))
    pipe = CnCPipeline(scheduler=scheduler, **base, **_load_fusers(source))
    m = source.config.model  # sample with the run's soft-guidance resize rule and attention precision
    pipe.set_attention(resize_mode=m.soft_guidance_resize, fp32_logits=m.attention_fp32_logits)
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    logger.info("loaded %s folder %s (stage %s, step %s, %s weights)", source.kind, source.path, source.config.stage,
                source.step, source.weights)
    return pipe


def model_card(source: Source, fuser: str | None = None) -> str:
    """A short markdown model card: what was trained, on which shards, how many steps, with which config."""
    cfg = source.config
    if cfg is None:
        return (f"# CnC pipeline\n\nExported from the pipeline folder `{source.path}` "
                f"(weights: {source.weights or 'unrecorded'}).\n")

    what = fuser or " + ".join(_trained(cfg))
    shards = "\n".join(f"- `{s}`" for s in cfg.data.train_shards) or "- (none recorded)"
    return (f"# CnC {what} (stage `{cfg.stage}`)\n\n"
            f"Compose and Conquer (ICLR 2024) {what}, trained with `cnc train` (stage `{cfg.stage}`) on top of the "
            f"frozen base model `{cfg.model.pretrained_model_name_or_path}`.\n\n"
            f"- steps: {source.step if source.step is not None else 'unknown'} (of {cfg.train.max_train_steps} "
            f"configured), batch {cfg.train.train_batch_size} per process x "
            f"{cfg.train.gradient_accumulation_steps} accumulation\n"
            f"- weights: {_weights_line(source)}\n"
            f"- resolution: {cfg.data.resolution}, seed {cfg.seed}, source: {source.kind} `{source.path}`\n\n"
            f"## Training shards\n\n{shards}\n\n{_conditions_section(source)}"
            f"{_unet_section(source)}"
            f"## Load\n\n```python\nfrom cnc_model.pipeline_cnc import CnCPipeline\n"
            f"## Config\n\n```yaml\n{yaml.safe_dump(config_dict(cfg), sort_keys=False)}```\n")


def _conditions_section(source: Source) -> str:
    """The model card's conditions: the build settings of the training shards, which sampling must reuse."""
    record = source.conditions_record()
    if not record:
        return ("## Conditions\n\nThe build settings of the training shards are not recorded; sample with the "
                "build config the shards were made with (`cnc sample ... -c BUILD_CONFIG`).\n\n")
    from triplets.conditions import settings_from

    settings = settings_from(record.get("sampling"))
    lines = [f"- `{k}`: {v}" for k, v in (settings.flat() if settings is not None else {}).items()]
    builds = "\n".join(f"- `{k}`: {'recorded' if v else 'unknown'}" for k, v in (record.get("builds") or {}).items())
    notes = "".join(f"- {n}\n" for n in record.get("notes") or [])
    return ("## Conditions\n\nSample with the conditions the fusers were trained on: `cnc sample` and `cnc eval` make "
            "them with these build settings by default (`triplets.conditions`); a different choice is reported and "
            f"recorded.\n\n{chr(10).join(lines)}\n\nBuilds:\n\n{builds}\n\n{notes}\n")


def _unet_section(source: Source) -> str:
    unet = source.unet_record()
    if not unet:
        return ""
    return (f"## Frozen UNet\n\nThe fusers were trained against the UNet `{unet.get('id')}` (identity "
            f"`{unet.get('identity')}`), not the base model's `unet/`.\n\n")


def _weights_line(source: Source) -> str:
    if source.weights == "ema":
        return f"ema (exponential moving average, train.ema_decay {source.ema_decay})"
    return "raw (the optimizer's weights)" if source.weights == "raw" else "unrecorded"


def export_pipeline(path: str | Path, output: str | Path, *, weights: str | None = None,
                    datasets: list[str] | None = None, license: str | None = None) -> Path:
    """Write a complete, self-contained pipeline folder (``model_index.json``, base parts, the stage's fusers).

    Every exported fuser folder gets a ``README.md`` model card, and the pipeline folder a Hub model card with
    metadata and ``pipeline_cnc.py`` (:mod:`cnc_model.card`: loads with diffusers' ``custom_pipeline``);
    ``cnc_export.json`` records the source, stage, step and weights (``ema`` / ``raw``). ``weights``: as in
    :func:`load_pipeline`; ``datasets`` / ``license``: the card's ``datasets`` (hub ids of the training data) and
    ``license`` (default :data:`cnc_model.card.DEFAULT_LICENSE`). Returns ``output``.
    """

    source = describe(path, weights)
    pipe = load_pipeline(source)
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    base = None if source.config is None else source.config.model.pretrained_model_name_or_path
    write_pipeline_files(out, model_card(source), base_model=base, datasets=datasets, license=license)
    for name in FUSERS:
        if getattr(pipe, name) is not None:
            (out / name / MODEL_CARD).write_text(model_card(source, name))
    meta = {"source": str(source.path), "kind": source.kind, "step": source.step, "base_model": base,
            "stage": None if source.config is None else source.config.stage, "weights": source.weights,
            "fusers": [n for n in FUSERS if getattr(pipe, n) is not None],
            "conditions": source.conditions_record(), "unet": source.unet_record(),
            "attention": {"resize_mode": pipe.soft_guidance_resize, "fp32_logits": pipe.attention_fp32_logits}}
    (out / EXPORT_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    logger.info("exported %s (%s weights) -> %s", source.path, source.weights, out)
    return out


__all__ = ["NotAPipelineError", "WeightsUnavailableError", "ModelUnavailableError", "Source", "WEIGHTS", "describe",
           "load_pipeline", "export_pipeline", "model_card"]

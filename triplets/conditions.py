"""The conditions of a triplet, made once: for the build, for ``cnc sample`` / ``compose`` and for ``cnc eval``.

A CnC model sees four conditions: the mask M, the fg depth D_f = depth(I ⊙ M), the bg depth D_b and two CLIP image
embeddings. The build makes them with its stages (:mod:`triplets.stages`); sampling must make them with **the same
stages and the same settings**, or the model is sampled on conditions it was never trained on. This module is that
one path:

* :class:`ConditionSettings` -- the part of a :class:`~triplets.config.BuildConfig` that decides the conditions
  (``resolution``, ``seed`` (it seeds the ``tiny`` models), ``dtype``, ``max_pixels``, ``segment.*``, ``depth.*``,
  ``embed.*``); saved in a build's ``_cnc/config.yaml`` and manifest, recorded by ``cnc train`` in the run's
  provenance (:func:`training_conditions`), read back by ``cnc sample`` / ``cnc eval`` (:func:`run_conditions`).
* :func:`condition_stages` -- the segment, depth and embed stages built from settings (the builder calls it).
* :class:`ConditionMaker` -- those stages applied to a foreground and a background photo, after the build's decode
  and crop geometry (:func:`triplets.stages.load.load_photo`): mask = segment(fg) (or the dataset mask the user
  gives), D_f / D_b = the depth stage on (fg, mask, bg) exactly as on (I, M, I_b), embeddings = the embed stage.
  Same photo, same settings ⇒ bit-identical mask and depth maps to the build's (tests/triplets/test_conditions.py).

At sampling the background photo plays I_b's part: D_b = depth(bg photo), e_b = CLIP(bg photo).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from cnc.base.errors import UserError
from cnc.base.location import resolve
from cnc.config import ConfigError, Seed, apply_overrides, load_config
from cnc.hub import TINY, resolve_all
from cnc.identity import model_identity
from cnc.tiny_store import TINY_SAM_TYPE
from triplets.config import BuildConfig, DepthConfig, EmbedConfig, SegmentConfig
from triplets.errors import SampleError

log = logging.getLogger(__name__)

#: Config keys naming a single local checkpoint file (no hub ids).
FILE_KEYS = ("segment.sam_checkpoint", "segment.u2net_checkpoint")
#: Files ``Conditions.write`` puts in a ``conditions/`` folder (the shard format's suffixes, plus the record).
CONDITION_FILES = ("mask.png", "fg_depth.png", "bg_depth.png", "fg_emb.npy", "bg_emb.npy", "conditions.json")
#: Fields compared between two settings (``batch_size`` fields change no value).
_IGNORED = {"batch_size"}


class ConditionsError(UserError, ValueError):
    """Conditions cannot be made as asked (a dataset mask is needed, settings are unreadable...): one line."""


class ConditionSettings(BaseModel):
    """What decides a triplet's conditions; the build's own config sections, so the values mean the same."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    resolution: int = Field(512, ge=16, description="side of the build's square crop (the training size)")
    seed: Seed = Field(0, description="the build's seed: it seeds the 'tiny' models")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_pixels: int = Field(64_000_000, ge=1)
    segment: SegmentConfig = SegmentConfig()
    depth: DepthConfig = DepthConfig()
    embed: EmbedConfig = EmbedConfig()

    @classmethod
    def from_build(cls, cfg: BuildConfig) -> ConditionSettings:
        return cls(resolution=cfg.resolution, seed=cfg.seed, dtype=cfg.dtype, max_pixels=cfg.max_pixels,
                   segment=cfg.segment, depth=cfg.depth, embed=cfg.embed)

    def as_build(self) -> BuildConfig:
        """A build config with these settings (the rest at its defaults): what ``-c`` files and ``--set`` keys of
        ``cnc sample`` are parsed into."""
        return BuildConfig(**self.model_dump())

    def model_ids(self, embeddings: bool = True) -> dict[str, str]:
        """Config key → model id of the condition models (segment, depth, and embed when ``embeddings``)."""
        ids = {}
        if self.segment.backend == "sam":
            ids["segment.sam_checkpoint"] = self.segment.sam_checkpoint
            ids["segment.saliency_model"] = self.segment.saliency_model
        elif self.segment.backend == "u2net":
            ids["segment.u2net_checkpoint"] = self.segment.u2net_checkpoint
        ids["depth.model"] = self.depth.model
        if embeddings:
            ids["embed.model"] = self.embed.model
        return ids

    def flat(self) -> dict[str, Any]:
        """``{"depth.preprocess": "reference", ...}`` of every field that changes a condition."""
        out = {}
        for key, value in self.model_dump().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items() if k not in _IGNORED})
            else:
                out[key] = value
        return out

    def differences(self, other: ConditionSettings) -> list[str]:
        """``"KEY: MINE -> OTHER"`` for every condition field that differs (settings only; unused backends' fields
        are skipped: a u2net build's ``segment.sam_checkpoint`` does not matter)."""
        mine, theirs = self.flat(), other.flat()
        used = _used_keys(self) | _used_keys(other)
        return [f"{k}: {mine[k]} -> {theirs[k]}" for k in sorted(mine) if k in used and mine[k] != theirs[k]]

    def summary(self) -> str:
        """One line: ``segment u2net, depth reference (Intel/dpt-large), 512 px``."""
        return (f"segment {self.segment.backend}, depth preprocess {self.depth.preprocess} ({self.depth.model}), "
                f"embed {self.embed.model} from the {self.embed.fg_source}, {self.resolution} px")


def _used_keys(s: ConditionSettings) -> set[str]:
    keys = set(s.flat())
    unused = {"sam": ("u2net_",), "u2net": ("sam_", "saliency_", "prior_"),
              "dataset": ("sam_", "saliency_", "prior_", "u2net_")}.get(s.segment.backend, ())
    return {k for k in keys if not any(k.startswith(f"segment.{p}") for p in unused)}


# ------------------------------------------------------------------------------------------------ models and stages
def resolve_condition_models(ids: dict[str, str], seed: int) -> dict[str, str]:
    """Config key → what to load, for every model in ``ids`` (:func:`cnc.hub.resolve_pretrained`).

    Raises:
        ModelUnavailableError: one line per missing model, each naming the model and its config key.
    """
    return resolve_all(ids, files=FILE_KEYS, seed=seed)


def condition_stages(cfg: BuildConfig | ConditionSettings, resolved: dict[str, str], device: str,
                     embeddings: bool = True, image_disparity: str = "off") -> tuple:
    """``(SegmentStage, DepthStage, EmbedStage | None)`` of ``cfg`` -- the builder's and the sampler's stages.

    Args:
        cfg: a build config or condition settings (``segment``, ``depth``, ``embed``, ``dtype``).
        resolved: config key → local path (:func:`resolve_condition_models`).
        device: where the models run.
        embeddings: build the embed stage (``False``: ``None``, e.g. for a pipeline without a global fuser).
        image_disparity: how the depth stage provides D(I) for the build's quality scores (``off``, ``reuse``,
            ``compute``; see :meth:`triplets.builder.TripletBuilder._image_disparity_mode`).
    """
    from triplets.stages import DepthStage, EmbedStage, SegmentStage

    common = dict(device=device, dtype=cfg.dtype)
    seg = cfg.segment
    seg_kwargs: dict[str, Any] = dict(backend=seg.backend, min_area=seg.min_area, max_area=seg.max_area)
    if seg.backend == "sam":
        sam_type = TINY_SAM_TYPE if seg.sam_checkpoint == TINY else seg.sam_model_type
        seg_kwargs.update(sam_checkpoint=resolved["segment.sam_checkpoint"], sam_model_type=sam_type,
                          saliency_model=resolved["segment.saliency_model"], prior_quantile=seg.prior_quantile,
                          sam_attention=seg.sam_attention, sam_precision=seg.sam_precision, **common)
    elif seg.backend == "u2net":
        seg_kwargs.update(u2net_checkpoint=resolved["segment.u2net_checkpoint"],
                          u2net_threshold=seg.u2net_threshold, **common)
    segment = SegmentStage(**seg_kwargs)
    depth = DepthStage(resolved["depth.model"], cfg.depth.mask_foreground_depth, preprocess=cfg.depth.preprocess,
                       image_disparity=image_disparity, **common)
    embed = EmbedStage(resolved["embed.model"], cfg.embed.fg_source, **common) if embeddings else None
    return segment, depth, embed


# ------------------------------------------------------------------------------------------------ the conditions
@dataclass
class Conditions:
    """One sample's conditions, in the shard format.

    Attributes:
        fg_image, bg_image: the cropped photos ``(h, w, 3)`` uint8 (the build's I and, at sampling, the photo in
            I_b's place).
        mask: ``(h, w)`` uint8 {0, 1}; ``mask_source`` / ``mask_area`` as in a sample's json.
        fg_depth, bg_depth: ``(h, w)`` uint16 (per-map min-max, near = 65535); ``*_range`` the raw disparity range.
        fg_emb, bg_emb: ``(D,)`` float32 CLIP ``image_embeds`` (``None`` when not computed).
        warnings: what differs from a healthy build sample (an area the build would have rejected...).
    """

    fg_image: np.ndarray
    bg_image: np.ndarray
    mask: np.ndarray
    mask_source: str
    mask_area: float
    fg_depth: np.ndarray
    bg_depth: np.ndarray
    fg_depth_range: tuple[float, float]
    bg_depth_range: tuple[float, float]
    fg_emb: np.ndarray | None = None
    bg_emb: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)

    def fg_depth_float(self) -> np.ndarray:
        from triplets.sample import depth_to_float

        return depth_to_float(self.fg_depth)

    def bg_depth_float(self) -> np.ndarray:
        from triplets.sample import depth_to_float

        return depth_to_float(self.bg_depth)

    def write(self, folder: str | Path, record: dict) -> None:
        """Write ``mask.png`` (uint8 {0, 255}), ``fg_depth.png`` / ``bg_depth.png`` (uint16), ``fg_emb.npy`` /
        ``bg_emb.npy`` (when computed) -- byte-compatible with a shard's members -- and ``conditions.json``
        (``record`` + the sample's mask and depth facts) into ``folder``."""

        from triplets.image_io import encode_png

        out = resolve(str(folder))
        out.child("mask.png").write_bytes(encode_png((self.mask > 0).astype(np.uint8) * 255))
        out.child("fg_depth.png").write_bytes(encode_png(self.fg_depth))
        out.child("bg_depth.png").write_bytes(encode_png(self.bg_depth))
        for name, emb in (("fg_emb.npy", self.fg_emb), ("bg_emb.npy", self.bg_emb)):
            if emb is not None:
                buf = io.BytesIO()
                np.save(buf, np.asarray(emb, np.float32))
                out.child(name).write_bytes(buf.getvalue())
        facts = {"mask_source": self.mask_source, "mask_area": round(float(self.mask_area), 6),
                 "fg_depth_range": [float(x) for x in self.fg_depth_range],
                 "bg_depth_range": [float(x) for x in self.bg_depth_range], "warnings": self.warnings}
        out.child("conditions.json").write_bytes(json.dumps({**record, **facts}, indent=1, default=str).encode())


def read_photo(photo, size: int | tuple[int, int], max_pixels: int) -> np.ndarray:
    """A photo (path, encoded bytes, PIL image or ``(H, W, 3)`` uint8 array) → ``(h, w, 3)`` uint8 cropped with the
    build's geometry; paths and bytes go through the build's decoder (:func:`~triplets.stages.load.load_photo`).

    Raises:
        ConditionsError: an unreadable or undecodable photo (one line).
    """
    from triplets.image_io import _to_rgb, resize_center_crop
    from triplets.stages.load import load_photo

    if isinstance(photo, (str, Path)):
        try:
            photo = Path(photo).read_bytes()
        except OSError as exc:
            raise ConditionsError(f"cannot read {photo}: {exc.strerror or exc}") from None
    if isinstance(photo, (bytes, bytearray)):
        try:
            return load_photo(bytes(photo), size, max_pixels=max_pixels)[0]
        except SampleError as exc:
            raise ConditionsError(exc.reason) from None
    if isinstance(photo, np.ndarray):
        if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
            raise ConditionsError(f"a photo array must be (H, W, 3) uint8, got {photo.dtype} {photo.shape}")
        return resize_center_crop(photo, size)[0]
    from PIL import Image, ImageOps

    if isinstance(photo, Image.Image):
        return resize_center_crop(np.asarray(_to_rgb(ImageOps.exif_transpose(photo)), np.uint8), size)[0]
    raise ConditionsError(f"a photo must be a path, bytes, a PIL image or a uint8 array, got {type(photo).__name__}")


class ConditionMaker:
    """The build's conditions for a foreground and a background photo (module docstring).

    ``maker(fg, bg, size=None, fg_mask=None, fg_mask_kind="binary", fg_reference=None, bg_reference=None)``
    → :class:`Conditions`. Models load once, here.

    Args:
        settings: the condition settings (usually those the model's training shards were built with).
        device: where the models run (``auto``: CUDA when present).
        embeddings: also compute the CLIP embeddings (the embed stage; not needed without a global fuser).
        resolved: config key → local path of every model (default: :func:`resolve_condition_models`).
    """

    def __init__(self, settings: ConditionSettings, device: str = "auto", embeddings: bool = True,
                 resolved: dict[str, str] | None = None) -> None:
        from triplets.stages.base import resolve_device

        self.settings = settings
        self.device = resolve_device(device)
        ids = settings.model_ids(embeddings)
        self.resolved = resolved or resolve_condition_models(ids, settings.seed)
        self.segment, self.depth, self.embed = condition_stages(settings, self.resolved, self.device, embeddings)
        self._identities: dict | None = None

    @property
    def model_identities(self) -> dict[str, dict]:
        """Config key → ``{"id", "revision", "identity"}`` of every condition model (hashes cached per file)."""
        if self._identities is None:

            ids = self.settings.model_ids(self.embed is not None)
            self._identities = {k: model_identity(mid, self.resolved[k]) for k, mid in ids.items()}
        return self._identities

    def __call__(self, fg, bg, size: int | tuple[int, int] | None = None, *, fg_mask=None,
                 fg_mask_kind: str = "binary", fg_reference=None, bg_reference=None) -> Conditions:
        """Conditions of one (fg, bg) pair.

        Args:
            fg, bg: photos (:func:`read_photo`); cropped to ``size`` (default: the build resolution, square).
            fg_mask: the fg photo's dataset mask (path or encoded PNG at the photo's size), read by the build's
                rule ``fg_mask_kind`` (``binary``: > half range; ``cocostuff``: thing classes). Needed by the
                ``dataset`` backend; with another backend it replaces the segmenter's mask (noted in ``warnings``).
            fg_reference, bg_reference: separate exemplar photos for the embeddings (default: the fg / bg photos).

        Raises:
            ConditionsError: a photo or mask that cannot be read, or the ``dataset`` backend without ``fg_mask``.
        """
        s = self.settings
        size = s.resolution if size is None else size
        fg_img, bg_img = read_photo(fg, size, s.max_pixels), read_photo(bg, size, s.max_pixels)
        dataset_mask = None if fg_mask is None else self._dataset_mask(fg, fg_mask, fg_mask_kind, size)
        warnings: list[str] = []
        rows = {"image": fg_img[None], "dataset_mask": (dataset_mask if dataset_mask is not None
                                                        else np.zeros(fg_img.shape[:2], np.uint8))[None],
                "has_dataset_mask": np.array([dataset_mask is not None])}
        if dataset_mask is not None and s.segment.backend != "dataset":
            from triplets.stages.segment import SegmentStage

            warnings.append(f"the given mask replaces segment.backend {s.segment.backend}")
            seg_cols, failures = SegmentStage("dataset", s.segment.min_area, s.segment.max_area).process(rows)
        else:
            seg_cols, failures = self.segment.process(rows)
        if 0 in failures:
            if s.segment.backend == "dataset" and dataset_mask is None:
                raise ConditionsError("these conditions use dataset masks (segment.backend: dataset): give the "
                                      "foreground's mask (--fg-mask), or choose a segmenter (--set "
                                      "segment.backend=u2net|sam)")
            warnings.append(f"{failures[0]}: the build would have rejected this sample")
        mask = seg_cols["mask"][0]
        dcols, _ = self.depth.process({"image": fg_img[None], "mask": mask[None], "background": bg_img[None]})
        fg_emb = bg_emb = None
        if self.embed is not None:
            fg_ex = fg_img if fg_reference is None else read_photo(fg_reference, size, s.max_pixels)
            bg_ex = bg_img if bg_reference is None else read_photo(bg_reference, size, s.max_pixels)
            ex_mask = mask
            if fg_reference is not None and self.embed.fg_source == "foreground":
                warnings.append("embed.fg_source foreground: the separate fg exemplar is embedded whole")
                ex_mask = np.ones_like(mask)
            ecols, _ = self.embed.process({"image": fg_ex[None], "mask": ex_mask[None], "background": bg_ex[None]})
            fg_emb, bg_emb = ecols["fg_emb"][0], ecols["bg_emb"][0]
        for line in warnings:
            log.warning("conditions: %s", line)
        return Conditions(
            fg_image=fg_img, bg_image=bg_img, mask=mask.astype(np.uint8), mask_source=str(seg_cols["mask_source"][0]),
            mask_area=float(seg_cols["mask_area"][0]), fg_depth=dcols["fg_depth"][0], bg_depth=dcols["bg_depth"][0],
            fg_depth_range=tuple(dcols["fg_depth_range"][0]), bg_depth_range=tuple(dcols["bg_depth_range"][0]),
            fg_emb=fg_emb, bg_emb=bg_emb, warnings=warnings)

    def _dataset_mask(self, fg, fg_mask, kind: str, size) -> np.ndarray:
        """The build's dataset-mask path (:func:`~triplets.stages.load.load_photo`) for the fg photo's mask."""
        from triplets.stages.load import load_photo

        if kind not in ("binary", "cocostuff"):
            raise ConditionsError(f"mask kind {kind!r} unknown; valid: binary, cocostuff")
        try:
            mask_data = Path(fg_mask).read_bytes() if isinstance(fg_mask, (str, Path)) else bytes(fg_mask)
            data = Path(fg).read_bytes() if isinstance(fg, (str, Path)) else fg
        except OSError as exc:
            raise ConditionsError(f"cannot read the mask {fg_mask}: {exc.strerror or exc}") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ConditionsError("a dataset mask needs the fg photo as a file or encoded bytes (its size is checked)")
        try:
            return load_photo(bytes(data), size, mask_data=mask_data, mask_kind=kind,
                              max_pixels=self.settings.max_pixels)[1]
        except SampleError as exc:
            raise ConditionsError(exc.reason) from None


# ------------------------------------------------------------------------------------------------ which settings
def build_settings(entry: str, depth: int = 0) -> ConditionSettings | None:
    """The condition settings a build folder (local or URL) was built with: from its manifest's ``config`` or its
    ``_cnc/config.yaml``; a derived build (``cnc filter`` / ``cnc score``) is followed to its source. ``None`` when
    the entry is not a build folder (a glob, a tar, ``pipe:``) and its folder records nothing either."""
    from triplets.shardio import BuildOutput
    from triplets.shardio.names import CONFIG_FILE, MANIFEST_FILE

    if entry.startswith("pipe:") or depth > 4:
        return None
    try:
        loc = resolve(entry)
        if not loc.isdir():  # a tar, a glob or a brace pattern: the folder holding the shards
            if "/" not in entry:
                return None
            loc = resolve(entry.rsplit("/", 1)[0])
            if not loc.isdir():
                return None
        out = BuildOutput(loc)
        manifest_loc = out.file(MANIFEST_FILE)
        manifest = json.loads(manifest_loc.read_bytes()) if manifest_loc.isfile() else {}
        if isinstance(manifest.get("config"), dict):
            return ConditionSettings.from_build(BuildConfig.model_validate(manifest["config"]))
        config_loc = out.file(CONFIG_FILE)
        if config_loc.isfile():

            return ConditionSettings.from_build(BuildConfig.model_validate(yaml.safe_load(config_loc.read_bytes())))
        if isinstance(manifest.get("derived_from"), str):
            return build_settings(manifest["derived_from"], depth + 1)
    except (UserError, OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        log.warning("build settings of %s unreadable: %s", entry, str(exc).splitlines()[0])
    return None


def training_conditions(train_shards: list[str]) -> dict:
    """What ``cnc train`` records under ``provenance.conditions``: ``{"builds": {entry: settings | None},
    "sampling": settings | None, "notes": [...]}`` (:func:`sampling_settings`)."""
    builds = {entry: build_settings(entry) for entry in train_shards}
    chosen, notes = sampling_settings(builds)
    return {"builds": {k: None if v is None else v.model_dump() for k, v in builds.items()},
            "sampling": None if chosen is None else chosen.model_dump(), "notes": notes}


def sampling_settings(builds: dict[str, ConditionSettings | None]) -> tuple[ConditionSettings | None, list[str]]:
    """One set of settings for sampling a model trained on ``builds`` (entry → settings), and notes.

    The first known build gives every setting; ``segment`` comes from the first build whose masks a sampler can
    make (not ``dataset``: at sampling there is no dataset mask unless the user gives one) -- the reference's
    COCO-Stuff (dataset masks) + Pick-a-Pic (U²-Net) recipe samples with U²-Net, as its demo. Other differences
    between the builds are notes (the model saw both kinds).
    """
    known = {k: v for k, v in builds.items() if v is not None}
    notes = [f"{k}: build settings unknown (no manifest or config.yaml)" for k, v in builds.items() if v is None]
    if not known:
        return None, notes
    first_key, first = next(iter(known.items()))
    segmenting = next(((k, v) for k, v in known.items() if v.segment.backend != "dataset"), None)
    chosen = first if segmenting is None else first.model_copy(update={"segment": segmenting[1].segment})
    if segmenting is not None and segmenting[0] != first_key:
        notes.append(f"segment settings from {segmenting[0]} ({segmenting[1].segment.backend}); {first_key} used "
                     f"{first.segment.backend} masks")
    for key, other in known.items():
        diff = [d for d in chosen.differences(other) if not d.startswith("segment.")]
        if diff:
            notes.append(f"{key} was built with other settings: {'; '.join(diff)}")
    return chosen, notes


def settings_from(value: dict | None) -> ConditionSettings | None:
    """Settings recorded as a dict (provenance, ``cnc_export.json``), or ``None``."""
    if not value:
        return None
    try:
        return ConditionSettings.model_validate(value)
    except ValueError as exc:
        log.warning("recorded condition settings unreadable: %s", str(exc).splitlines()[0])
        return None


def reference_settings() -> ConditionSettings:
    """The reference implementation's conditions (``configs/build/reference-pickapic.yaml``: its demo samples with
    U²-Net masks on the fg photo and MiDaS without its transform), recorded by ``cnc convert-reference``."""

    return ConditionSettings.from_build(load_config(BuildConfig, "build/reference-pickapic"))


@dataclass
class ConditionChoice:
    """The settings a sampler uses and why.

    Attributes:
        settings: what the conditions are made with.
        origin: where they come from (``"training shards"``, ``"explicit"``, ``"default"``).
        trained: the settings the model was trained with (``None``: not recorded).
        differences: ``"KEY: TRAINED -> USED"`` lines (empty when the same, or when ``trained`` is unknown).
        notes: facts about the choice (mixed builds...).
    """

    settings: ConditionSettings
    origin: str
    trained: ConditionSettings | None
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one line ``cnc sample`` / ``cnc eval`` print about their conditions."""
        if self.trained is None:
            return (f"conditions: the model's training conditions are not recorded; using {self.origin} settings "
                    f"({self.settings.summary()})")
        if self.differences:
            return ("conditions DIFFER from the model's training shards: " + "; ".join(self.differences))
        return f"conditions: as the model's training shards ({self.settings.summary()})"

    def record(self) -> dict:
        """JSON record of the choice (``conditions.json``, ``metrics.json``)."""
        return {"origin": self.origin, "settings": self.settings.model_dump(),
                "trained": None if self.trained is None else self.trained.model_dump(),
                "differences": self.differences, "notes": self.notes}


def choose_conditions(trained: ConditionSettings | None, *, config: str | Path | None = None,
                      overrides: list[str] | None = None, notes: list[str] | None = None) -> ConditionChoice:
    """The settings to sample with: the model's training settings by default; a build config (``config``: a file or
    a shipped name such as ``build/reference-pickapic``) and ``key=value`` overrides (build config keys) change
    them, and every change is listed in :attr:`ConditionChoice.differences`.

    Raises:
        ConfigError: an unreadable config or an override naming no build key.
    """

    if config is not None:
        base = ConditionSettings.from_build(load_config(BuildConfig, config))
        origin = f"explicit ({config})"
    elif trained is not None:
        base, origin = trained, "training shards"
    else:
        base, origin = ConditionSettings.from_build(load_config(BuildConfig, "build/default")), "default"
    if overrides:
        data = apply_overrides(base.as_build().model_dump(), overrides)

        try:
            base = ConditionSettings.from_build(BuildConfig.model_validate(data))
        except ValueError as exc:
            raise ConfigError(f"invalid conditions --set: {str(exc).splitlines()[0]}") from None
        origin = f"{origin} + --set {' '.join(overrides)}"
    differences = [] if trained is None else trained.differences(base)
    return ConditionChoice(settings=base, origin=origin, trained=trained, differences=differences,
                           notes=list(notes or []))


def compare_builds(record: dict | None, shards: list[str]) -> dict:
    """The evaluation shards' build settings against the model's training ones (``cnc eval``).

    Args:
        record: the model's ``conditions`` record (:meth:`cnc_model.loading.Source.conditions_record`).
        shards: the evaluation shard entries (build folders, globs...).

    Returns:
        ``{"evaluated": {entry: settings | None}, "differences": ["ENTRY: KEY: TRAINED -> EVALUATED", ...],
        "trained_known": bool, "line": the one line to print}``; each evaluation build is compared with the closest
        training build (a model trained on COCO-Stuff + Pick-a-Pic builds matches either).
    """
    record = record or {}
    trained = [s for s in (settings_from(v) for v in (record.get("builds") or {}).values()) if s is not None]
    if not trained and settings_from(record.get("sampling")) is not None:
        trained = [settings_from(record.get("sampling"))]
    evaluated = {entry: build_settings(entry) for entry in shards}
    differences = []
    for entry, settings in evaluated.items():
        if settings is None:
            differences.append(f"{entry}: build settings unknown")
        elif trained:
            differences += [f"{entry}: {d}" for d in min((t.differences(settings) for t in trained), key=len)]
    if not trained:
        line = ("conditions: the model's training conditions are not recorded; the evaluation shards' conditions are "
                "used as built")
    elif differences:
        line = "conditions of the evaluation shards DIFFER from the model's training shards: " + "; ".join(differences)
    else:
        line = "conditions: the evaluation shards were built with the training shards' settings"
    return {"evaluated": {k: None if v is None else v.model_dump() for k, v in evaluated.items()},
            "differences": differences, "trained_known": bool(trained), "line": line}

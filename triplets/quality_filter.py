"""Filtering on the ``quality`` scores: ``--where`` conditions (``cnc filter``) and the trainer's ``data.filter``.

What a filter does with a sample that cannot be judged is the user's choice, never a silent default score:

* no ``quality`` at all (shards built before scoring), or a score that is undefined on this sample (``null``):
  kept with ``keep_unscored`` (``--keep-unscored``), else dropped with reason ``unscored`` / ``SCORE undefined``;
* scores of another :data:`~triplets.quality.QUALITY_VERSION` (their numbers mean something else): ``cnc filter``
  refuses (:class:`QualityVersionError`) unless told (``--allow-version-mix``), which, like the trainer, treats them
  as unscored (reason ``quality vN``). ``cnc score`` rescores old shards to the current version.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cnc.base.errors import UserError
from triplets.quality import QUALITY_VERSION, SCORES, quality_version, score_value

log = logging.getLogger(__name__)


class FilterSpecError(UserError, ValueError):
    """A ``--where`` condition or a filter threshold that names no score or does not parse."""


class QualityVersionError(UserError, ValueError):
    """Samples scored by another quality version reached a filter told to refuse them."""


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
_WHERE = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Condition:
    """``score OP value``."""

    score: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.score}{self.op}{self.value:g}"

    def holds(self, meta: dict) -> bool | None:
        """True / False, or ``None`` when the score is undefined on this sample (or the sample is unscored)."""
        v = score_value(meta, self.score)
        return None if v is None else _OPS[self.op](v, self.value)


def parse_where(text: str) -> Condition:
    """``"removal>=0.5"`` → :class:`Condition` (raises :class:`FilterSpecError` naming the valid scores)."""
    m = _WHERE.match(text)
    if not m:
        raise FilterSpecError(f"--where {text!r}: expected SCORE OP NUMBER, e.g. removal>=0.5 (OP: "
                              f"{', '.join(_OPS)})")
    name, op, value = m.groups()
    if name not in SCORES:
        raise FilterSpecError(f"--where {text!r}: unknown score {name!r}; valid: {', '.join(SCORES)}")
    try:
        number = float(value)
    except ValueError:
        raise FilterSpecError(f"--where {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise FilterSpecError(f"--where {text!r}: the value must be finite")
    return Condition(name, op, number)


def recommended_conditions() -> list[Condition]:
    """The shipped thresholds of the benchmarked scores (:data:`~triplets.quality.SCORES` ``threshold``) that
    ``cnc filter --recommended`` applies: ``removal`` and ``depth_order``."""
    return [Condition(n, SCORES[n].keep_op, SCORES[n].threshold) for n in ("removal", "depth_order")]


class QualityFilter:
    """All conditions must hold (module docstring for unscored, undefined and other-version samples).

    ``reason(meta)`` is ``None`` for a kept sample, else why it is dropped: the first failed condition
    (``"removal>=0.5"``), ``"unscored"``, ``"SCORE undefined"`` or ``"quality vN"``.

    Args:
        keep_unscored: keep samples that cannot be judged (no scores, an undefined score, another version when
            allowed).
        refuse_other_versions: raise :class:`QualityVersionError` on a sample scored by another version (``cnc
            filter`` without ``--allow-version-mix``) instead of treating it as unscored.
    """

    def __init__(self, conditions: list[Condition], keep_unscored: bool = True, refuse_other_versions: bool = False):
        self.conditions, self.keep_unscored = list(conditions), keep_unscored
        self.refuse_other_versions = refuse_other_versions
        self._warned: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def reason(self, meta: dict) -> str | None:
        if not self.conditions:
            return None
        version = quality_version(meta)
        if version is None:
            return None if self.keep_unscored else "unscored"
        if version != QUALITY_VERSION:
            if self.refuse_other_versions:
                raise QualityVersionError(
                    f"sample {meta.get('key', '?')!r} carries quality version {version} scores, this cnc scores "
                    f"version {QUALITY_VERSION} (the numbers mean different things): rescore the build with "
                    f"`cnc score SOURCE --output NEW`, or pass --allow-version-mix to treat them as unscored")
            if version not in self._warned:  # never silent: the filter does not judge these samples
                self._warned.add(version)
                log.warning("quality filter: samples carry quality version %s scores (this cnc: %s); they are %s "
                            "unjudged — rescore the shards with `cnc score`", version, QUALITY_VERSION,
                            "kept" if self.keep_unscored else "dropped")
            return None if self.keep_unscored else f"quality v{version}"
        for c in self.conditions:
            ok = c.holds(meta)
            if ok is None:
                if not self.keep_unscored:
                    return f"{c.score} undefined"
            elif not ok:
                return str(c)
        return None

    def __call__(self, meta: dict) -> bool:
        return self.reason(meta) is None

    def describe(self) -> str:
        return " and ".join(map(str, self.conditions)) or "(none)"


class FilterConfig(BaseModel):
    """``data.filter`` of the trainer: thresholds on the ``quality`` scores, applied while streaming.

    Every threshold is off (``null``) by default; docs/build.md ("Quality scores") tables each score's precision and
    recall at candidate thresholds. Samples that cannot be judged (no scores, an undefined score, scores of another
    quality version) follow ``keep_unscored``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN threshold would drop every sample

    min_removal: float | None = Field(None, description="removal score >= this (0 = object still there, 1 = gone; "
                                                        "shipped threshold 0.5)")
    max_removal_contrast: float | None = Field(None, description="M's contrast to its rim left in I_b <= this")
    max_clip_sim: float | None = Field(None, description="CLIP similarity of the crop around M with and without I_b "
                                                         "<= this")
    min_depth_order: float | None = Field(None, description="fraction of M nearer than what replaced it >= this "
                                                            "(shipped threshold 0.5)")
    min_depth_margin: float | None = Field(None, description="mean aligned fg - bg disparity in M >= this")
    min_mask_area: float | None = Field(None, description="mask area >= this")
    max_mask_area: float | None = Field(None, description="mask area <= this")
    max_mask_components: int | None = Field(None, description="connected components of M <= this")
    max_mask_border: float | None = Field(None, description="fraction of the image border in M <= this")
    min_mask_bbox_fill: float | None = Field(None, description="|M| / bbox area >= this")
    keep_unscored: bool = Field(True, description="keep samples that cannot be judged: no quality scores (add them "
                                                  "with `cnc score`), an undefined score, or scores of another "
                                                  "quality version")

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data):
        if isinstance(data, dict) and data.get("max_removal_residual") is not None:
            raise ValueError("max_removal_residual: removal.residual was removed in quality version 2; use "
                             "max_removal_contrast or min_removal (docs/build.md, 'Quality scores')")
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "max_removal_residual"}
        return data

    def conditions(self) -> list[Condition]:
        out = []
        for key, value in self.model_dump().items():
            if key == "keep_unscored" or value is None:
                continue
            bound, name = key.split("_", 1)
            out.append(Condition(name, ">=" if bound == "min" else "<=", float(value)))
        return out

    def build(self) -> QualityFilter:
        return QualityFilter(self.conditions(), self.keep_unscored)

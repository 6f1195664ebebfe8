"""Streaming, mergeable statistics of a set of shards.

Every accumulator takes one value at a time and merges with another of its kind, so a summary of
any number of samples holds a few hundred numbers, and per-shard summaries computed in worker
processes combine into the same result as one sequential pass.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from triplets.quality import SCORES, has_quality, score_value
from triplets.sample import DEPTH_MAX, TripletSample
from triplets.shardio.records import ShardMarker

_DIGITS = re.compile(r"\d+(\.\d+)?")


@dataclass
class Histogram:
    """Counts over fixed bins; values outside ``[edges[0], edges[-1]]`` go to the end bins."""

    edges: list[float]
    counts: list[int]

    @classmethod
    def uniform(cls, lo: float, hi: float, bins: int) -> Histogram:
        return cls([lo + (hi - lo) * i / bins for i in range(bins + 1)], [0] * bins)

    def add(self, x: float) -> None:
        lo, hi, bins = self.edges[0], self.edges[-1], len(self.counts)
        i = int((x - lo) / (hi - lo) * bins) if hi > lo else 0
        self.counts[min(max(i, 0), bins - 1)] += 1

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]


@dataclass
class RunningStats:
    """Count, mean, std, min and max of a stream of numbers."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    min: float | None = None
    max: float | None = None

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.total_sq += x * x
        self.min = x if self.min is None else min(self.min, x)
        self.max = x if self.max is None else max(self.max, x)

    def merge(self, other: RunningStats) -> None:
        if other.n == 0:
            return
        self.n, self.total, self.total_sq = self.n + other.n, self.total + other.total, self.total_sq + other.total_sq
        self.min = other.min if self.min is None else min(self.min, other.min)
        self.max = other.max if self.max is None else max(self.max, other.max)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def std(self) -> float | None:
        if not self.n:
            return None
        return math.sqrt(max(self.total_sq / self.n - (self.total / self.n) ** 2, 0.0))


def depth_margin(sample: TripletSample) -> float | None:
    """Mean foreground minus mean background disparity inside the mask, both normalised to [0, 1].

    Positive when the object is nearer in its own depth map than the inpainted background is at the same
    pixels, the ordering depth disentanglement training relies on. ``None`` for an empty mask.
    """
    m = sample.mask.astype(bool)
    if not m.any():
        return None
    fg = sample.fg_depth[m].astype(np.float64).mean() / DEPTH_MAX
    bg = sample.bg_depth[m].astype(np.float64).mean() / DEPTH_MAX
    return float(fg - bg)


@dataclass
class DepthOrder:
    """How often the foreground is nearer than the background inside the mask (see :func:`depth_margin`).

    Attributes:
        n: samples with a non-empty mask; ``fg_nearer`` of them have a positive margin.
        empty_mask: samples skipped because their mask is empty.
        margin: histogram of the margin over [-1, 1].
    """

    n: int = 0
    fg_nearer: int = 0
    empty_mask: int = 0
    margin: Histogram = field(default_factory=lambda: Histogram.uniform(-1.0, 1.0, 20))

    def add(self, margin: float | None) -> None:
        if margin is None:
            self.empty_mask += 1
            return
        self.n += 1
        self.fg_nearer += margin > 0
        self.margin.add(margin)

    def merge(self, other: DepthOrder) -> None:
        self.n, self.fg_nearer, self.empty_mask = (self.n + other.n, self.fg_nearer + other.fg_nearer,
                                                   self.empty_mask + other.empty_mask)
        self.margin.merge(other.margin)

    @property
    def fraction(self) -> float | None:
        return self.fg_nearer / self.n if self.n else None


@dataclass
class ScoreStats:
    """Distribution of one quality score (see :data:`triplets.quality.SCORES`): histogram over the score's range
    (10 bins; values outside go to the end bins), running statistics, and samples where it is undefined."""

    hist: Histogram
    stats: RunningStats = field(default_factory=RunningStats)
    undefined: int = 0

    @classmethod
    def for_score(cls, name: str) -> ScoreStats:
        sc = SCORES[name]
        return cls(Histogram.uniform(sc.lo, sc.hi, 10))

    def add(self, v: float | None) -> None:
        if v is None:
            self.undefined += 1
            return
        self.hist.add(v)
        self.stats.add(v)

    def merge(self, other: ScoreStats) -> None:
        self.hist.merge(other.hist)
        self.stats.merge(other.stats)
        self.undefined += other.undefined


def _quality_stats() -> dict[str, ScoreStats]:
    return {name: ScoreStats.for_score(name) for name in SCORES}


@dataclass
class Throughput:
    """Build speed from the stats markers: ``seconds`` are worker-seconds summed over shards."""

    shards_with_stats: int = 0
    samples: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def add_marker(self, marker: ShardMarker) -> None:
        n, sec = marker.nsamples, marker.seconds
        if n is None or sec is None:
            return
        self.shards_with_stats += 1
        self.samples += n
        self.seconds += sec
        for stage, v in (marker.stage_seconds or {}).items():
            if isinstance(v, (int, float)):
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + float(v)

    def merge(self, other: Throughput) -> None:
        self.shards_with_stats += other.shards_with_stats
        self.samples += other.samples
        self.seconds += other.seconds
        for stage, v in other.stage_seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + v

    @property
    def samples_per_second(self) -> float | None:
        """Samples per worker-second (multiply by the worker count for the cluster rate)."""
        return self.samples / self.seconds if self.seconds > 0 else None


def failure_reason(stage: str | None, reason: str | None) -> str:
    """Group key of a failure row: ``"stage: reason"`` with specifics (text after a colon, numbers) removed."""
    text = (reason or "unknown").split(": ", 1)[0]
    text = _DIGITS.sub("N", text).strip()[:80]
    return f"{stage or '?'}: {text}"


@dataclass
class Summary:
    """Statistics of a set of shards (all counts; JSON-ready through :meth:`to_dict`).

    Attributes:
        shards / samples / bytes: what was read.
        resolutions / embedding_dims: value → sample count (keys are strings for JSON).
        failures: ``"stage: reason"`` → count of source items that did not become samples (``errors/``).
        mask_area: histogram of the mask's fraction of the image over [0, 1] (10 bins).
        depth_order: foreground-nearer-than-background check inside the mask.
        caption_chars / caption_words: caption length; ``empty_captions`` counts blank ones.
        throughput: build speed from the stats markers.
        quality: score name → :class:`ScoreStats` over the samples that carry ``quality``; ``unscored`` counts
            the samples without it (shards built before scoring).
    """

    shards: int = 0
    samples: int = 0
    bytes: int = 0
    resolutions: dict[str, int] = field(default_factory=dict)
    embedding_dims: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    mask_area: Histogram = field(default_factory=lambda: Histogram.uniform(0.0, 1.0, 10))
    mask_area_stats: RunningStats = field(default_factory=RunningStats)
    depth_order: DepthOrder = field(default_factory=DepthOrder)
    caption_chars: RunningStats = field(default_factory=RunningStats)
    caption_words: RunningStats = field(default_factory=RunningStats)
    empty_captions: int = 0
    throughput: Throughput = field(default_factory=Throughput)
    quality: dict[str, ScoreStats] = field(default_factory=_quality_stats)
    unscored: int = 0

    def add_quality(self, meta: dict) -> None:
        if not has_quality(meta):
            self.unscored += 1
            return
        for name, st in self.quality.items():
            st.add(score_value(meta, name))

    @property
    def scored(self) -> int:
        return max((st.stats.n + st.undefined for st in self.quality.values()), default=0)

    def add_sample(self, s: TripletSample) -> None:
        self.samples += 1
        _bump(self.resolutions, str(s.image.shape[0]) if s.image.shape[0] == s.image.shape[1]
              else f"{s.image.shape[1]}x{s.image.shape[0]}")
        _bump(self.embedding_dims, str(s.fg_emb.shape[0]) if s.fg_emb.ndim == 1 else str(s.fg_emb.shape))
        area = float(s.mask.mean()) if s.mask.size else 0.0
        self.mask_area.add(area)
        self.mask_area_stats.add(area)
        self.depth_order.add(depth_margin(s))
        caption = s.caption.strip()
        self.caption_chars.add(len(caption))
        self.caption_words.add(len(caption.split()))
        self.empty_captions += not caption
        self.add_quality(s.meta)

    def add_failures(self, counts: Counter | dict) -> None:
        for k, v in counts.items():
            _bump(self.failures, k, v)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def merge(self, other: Summary) -> None:
        self.shards += other.shards
        self.samples += other.samples
        self.bytes += other.bytes
        for mine, theirs in ((self.resolutions, other.resolutions), (self.embedding_dims, other.embedding_dims),
                             (self.failures, other.failures)):
            for k, v in theirs.items():
                _bump(mine, k, v)
        self.mask_area.merge(other.mask_area)
        self.mask_area_stats.merge(other.mask_area_stats)
        self.depth_order.merge(other.depth_order)
        self.caption_chars.merge(other.caption_chars)
        self.caption_words.merge(other.caption_words)
        self.empty_captions += other.empty_captions
        self.throughput.merge(other.throughput)
        for name, st in other.quality.items():
            self.quality.setdefault(name, ScoreStats.for_score(name)).merge(st)
        self.unscored += other.unscored

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = self.failed
        d["depth_order"]["fraction"] = self.depth_order.fraction
        d["throughput"]["samples_per_second"] = self.throughput.samples_per_second
        for name in ("mask_area_stats", "caption_chars", "caption_words"):
            stats = getattr(self, name)
            d[name].update(mean=stats.mean, std=stats.std)
        for name, st in self.quality.items():
            d["quality"][name]["stats"].update(mean=st.stats.mean, std=st.stats.std)
        return d


def _bump(d: dict, k: str, v: int = 1) -> None:
    d[k] = d.get(k, 0) + v

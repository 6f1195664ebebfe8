"""What a build reports: :class:`BuildResult`, the totals of a build folder after a run and the exit status they
mean. Returned by :func:`pipelines.build.run_build`, shown by :func:`pipelines.progress.print_summary`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from triplets.shardio.names import shard_name


@dataclass
class BuildResult:
    """Totals of a build folder after a run (committed shards of every run so far + this run)."""

    output: str
    items_total: int
    shards_total: int
    shards_committed: int
    shards_built: int
    shards_skipped: int
    shards_lost: list[int]
    samples: int
    failures: int
    max_failure_fraction: float
    seconds: float
    items_processed: int = 0
    bytes: int = 0
    failures_by_stage: dict[str, int] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    interrupted: int | None = None  # the signal that stopped the run

    @property
    def failure_fraction(self) -> float:
        return self.failures / self.items_total if self.items_total else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.items_processed / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every shard is committed and failures/items ≤ ``max_failure_fraction``; 128 + signal after
        SIGINT/SIGTERM; else 1."""
        if self.interrupted:
            return 128 + self.interrupted
        return 0 if not self.shards_lost and self.failure_fraction <= self.max_failure_fraction else 1

    def status_line(self) -> str:
        """What the exit status means, in one line: which rule gave a 1 (the setting and the fraction, or the
        uncommitted shards) and whether the committed shards are usable."""
        if self.interrupted:
            return (f"interrupted by signal {self.interrupted} (exit {self.exit_code}): {self.shards_committed} of "
                    f"{self.shards_total} shards committed; rerun the same command to resume")
        if self.shards_lost:
            return (f"exit 1: {len(self.shards_lost)} of {self.shards_total} shard(s) not committed "
                    f"({', '.join(map(shard_name, self.shards_lost[:10]))}); the {self.shards_committed} committed "
                    "shard(s) are usable; rerun the same command to build the rest")
        if self.failure_fraction > self.max_failure_fraction:
            return (f"exit 1: {self.failures} of {self.items_total} input items failed ({self.failure_fraction:.1%}), "
                    f"more than max_failure_fraction={self.max_failure_fraction:g}; all {self.shards_committed} "
                    f"shard(s) are committed and usable ({self.samples} samples). Accept with --set "
                    f"max_failure_fraction={_ceil_fraction(self.failure_fraction)}, or fix the inputs listed in the "
                    "errors files and rerun with --retry-failed")
        return (f"OK: {self.samples} samples in {self.shards_committed} shard(s); {self.failures} of "
                f"{self.items_total} items failed ({self.failure_fraction:.1%} <= max_failure_fraction="
                f"{self.max_failure_fraction:g})")


def _ceil_fraction(x: float) -> str:
    """The smallest two-decimal fraction >= ``x`` (``0.375`` -> ``0.38``)."""
    return f"{min(1.0, math.ceil(x * 100 - 1e-9) / 100):g}"

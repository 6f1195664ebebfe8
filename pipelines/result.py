"""What a build reports: :class:`BuildResult`, the totals of a build folder after a run and the exit status they
mean. Returned by :func:`pipelines.build.run_build`, shown by :func:`pipelines.progress.print_summary`."""

from __future__ import annotations

from dataclasses import dataclass, field


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

"""Live progress and the final summary table of a build.

On a terminal one rich progress bar shows samples done / planned, samples/s, failures and ETA;
elsewhere (Ray job logs, CI) the same numbers go to the log every ``interval`` seconds.
The driver refreshes it from the workers' per-batch reports (:class:`~pipelines.scheduler.ProgressTracker`).
"""

from __future__ import annotations

import logging
import sys
import time

from cnc.progress import fmt_eta
from pipelines.result import BuildResult
from triplets.shardio.names import shard_name

log = logging.getLogger(__name__)


class BuildProgress:
    """Progress of ``total`` samples; :meth:`update` is cheap, rendering is rate-limited.

    Args:
        total: samples to process in this run.
        enabled: ``None`` = a live bar on a terminal, log lines otherwise; ``False`` = log lines only.
        interval: seconds between log lines (the bar redraws itself).
    """

    def __init__(self, total: int, enabled: bool | None = None, interval: float = 5.0):
        self.total, self.interval = total, interval
        self.start = time.monotonic()
        self.done = self.failed = self.shards_done = 0
        self.shards_total = 0
        self._last_log = 0.0
        self._first: tuple[float, int] | None = None  # (time, done) of the first report with samples
        self._progress = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled and total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]build"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.2f} samples/s"), TextColumn("failed {task.fields[failed]}"),
                TextColumn("shards {task.fields[shards]}"), TextColumn("ETA {task.fields[eta]}"),
                TimeElapsedColumn(), console=Console(stderr=True), refresh_per_second=2,
            )
            self._task = self._progress.add_task("build", total=total, rate=0.0, failed=0, shards="0/0", eta="?")
            self._progress.start()

    @property
    def rate(self) -> float:
        """Samples/s since the first reported sample (model loading would bias the ETA)."""
        if self._first is None:
            return 0.0
        t0, d0 = self._first
        elapsed = time.monotonic() - t0
        if self.done > d0 and elapsed > 0:
            return (self.done - d0) / elapsed
        return self.done / max(1e-9, time.monotonic() - self.start)

    @property
    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.done else None

    def update(self, done: int, failed: int, shards_done: int, shards_total: int) -> None:
        self.done, self.failed = min(done, self.total), failed
        if self._first is None and self.done:
            self._first = (time.monotonic(), self.done)
        self.shards_done, self.shards_total = shards_done, shards_total
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, rate=self.rate, failed=failed,
                                  shards=f"{shards_done}/{shards_total}", eta=fmt_eta(self.eta))
        now = time.monotonic()
        if self._progress is None and now - self._last_log >= self.interval:
            self._last_log = now
            log.info("progress: %d/%d samples (%.1f%%), %.2f samples/s, %d failed, shards %d/%d, ETA %s",
                     self.done, self.total, 100 * self.done / max(1, self.total), self.rate, failed, shards_done,
                     shards_total, fmt_eta(self.eta))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def summary_table(result: BuildResult):
    """A rich table of a finished build (totals, failures by stage/reason, stage seconds)."""
    from rich.table import Table

    t = Table(title=f"cnc build: {result.output}", show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("planned items", result.items_total),
        ("shards committed / planned", f"{result.shards_committed}/{result.shards_total}"),
        ("shards built this run", result.shards_built),
        ("shards skipped (already committed)", result.shards_skipped),
        ("samples", result.samples),
        ("failures", (f"{result.failures} ({100 * result.failure_fraction:.2f}%, "
                      f"limit {100 * result.max_failure_fraction:.2f}%)")),
        ("uncommitted shards", ", ".join(map(shard_name, result.shards_lost)) or "none"),
        ("seconds", f"{result.seconds:.1f}"),
        ("samples/s (this run)", f"{result.samples_per_s:.2f}"),
        ("bytes", f"{result.bytes:,}"),
    ]
    for stage, n in sorted(result.failures_by_stage.items()):
        rows.append((f"failed in {stage}", n))
    for reason, n in sorted(result.failures_by_reason.items(), key=lambda kv: -kv[1])[:8]:
        rows.append((f"  reason: {reason[:200]}", n))
    for stage, s in result.stage_seconds.items():
        rows.append((f"{stage} seconds (this run)", f"{s:.1f}"))
    rows.append(("status", "OK" if result.exit_code == 0 else f"exit {result.exit_code}: see the line below"))
    for k, v in rows:
        t.add_row(str(k), str(v))
    return t


def print_summary(result: BuildResult) -> None:
    """Render :func:`summary_table` on stderr (CLI only)."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print(summary_table(result))
    console.print(result.status_line(), soft_wrap=True, highlight=False, markup=False)

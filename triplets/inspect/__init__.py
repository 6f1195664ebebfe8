"""Validate, summarise and look at triplet shards (``cnc inspect``).

One streaming pass per shard validates it (reads to the end, complete and well-typed samples,
unique keys, stats markers that agree), accumulates summary statistics and picks samples to show::

    from triplets.inspect import inspect_shards, validate, write_report

    validate("out/build", max_shards=4).ok          # cheap pre-training check
    result = inspect_shards("out/build", n=16, seed=0)
    write_report(result, "out/build/_cnc/inspect", html=True)

Modules: ``validate`` (checks and the pass), ``summary`` (streaming statistics), ``render`` (contact sheets),
``report`` (tables, files, HTML). Finding shards and streaming tars is :mod:`triplets.shardio`'s job.
"""

from triplets.inspect.render import SheetLayout, colorize, colormap_lut, contact_sheet, contact_sheets
from triplets.inspect.report import ReportFiles, html_report, print_report, summary_rows, write_report
from triplets.inspect.summary import DepthOrder, Histogram, RunningStats, Summary, Throughput, depth_margin
from triplets.inspect.validate import (
    InspectResult,
    Problem,
    ShardCheck,
    ValidationResult,
    inspect_shards,
    scan_shard,
    select_samples,
    summarise,
    validate,
)

__all__ = [
    "DepthOrder", "Histogram", "InspectResult", "Problem", "ReportFiles", "RunningStats", "ShardCheck",
    "SheetLayout", "Summary", "Throughput", "ValidationResult", "colorize",
    "colormap_lut", "contact_sheet", "contact_sheets", "depth_margin", "html_report", "inspect_shards",
    "print_report", "scan_shard", "select_samples", "summarise", "summary_rows", "validate",
    "write_report",
]

"""Present an :class:`~triplets.inspect.validate.InspectResult`: rich tables, files, a self-contained HTML page.

:func:`write_report` writes into ``out_dir``::

    contact_sheet_000.png ...   one sheet per page of samples (see triplets.inspect.render)
    summary.json                Summary.to_dict(), validation counts, every kept problem line, sample keys
    problems.txt                one line per problem (only when there are any)
    worst_<score>.png           the worst-k samples of each quality score (``worst`` > 0), worst first
    index.html                  with html=True: a compact page with a table of contents: summary, SVG histograms
                                (``where`` thresholds drawn), the worst samples (each once), problems and one row
                                per sample with its json; JPEG thumbnails as data URIs, no external references
                                (layout: :mod:`triplets.inspect.html`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from triplets.inspect.render import contact_sheet, contact_sheets
from triplets.inspect.summary import ScoreStats, Summary
from triplets.inspect.validate import InspectResult, ValidationResult
from triplets.quality import QUALITY_VERSION, SCORES

_BAR = "█"


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`."""

    sheets: list[Path] = field(default_factory=list)
    worst: list[Path] = field(default_factory=list)
    summary_json: Path | None = None
    problems_txt: Path | None = None
    html: Path | None = None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"


def summary_rows(summary: Summary, validation: ValidationResult | None = None) -> list[tuple[str, str]]:
    """``(label, value)`` rows shared by the terminal table and the HTML report."""
    s = summary
    attempted = s.samples + s.failed
    rows = [("shards", str(s.shards)), ("samples", str(s.samples)), ("size", _human_bytes(s.bytes))]
    if s.resolutions:  # empty when samples were not decoded
        rows += [("resolution", _counts(s.resolutions)), ("embedding dim", _counts(s.embedding_dims))]
    rows.append(("failed items", f"{s.failed} ({s.failed / attempted:.1%} of {attempted})" if attempted else "0"))
    d = s.depth_order
    if d.fraction is not None:
        rows.append(("fg nearer than bg in M", f"{d.fraction:.1%} ({d.fg_nearer}/{d.n})"
                     + (f", {d.empty_mask} empty masks" if d.empty_mask else "")))
    m = s.mask_area_stats
    if m.n:
        rows.append(("mask area", f"mean {m.mean:.1%} ± {m.std:.1%}, min {m.min:.1%}, max {m.max:.1%}"))
    for label, st in (("caption chars", s.caption_chars), ("caption words", s.caption_words)):
        if st.n:
            rows.append((label, f"mean {st.mean:.1f}, min {st.min:.0f}, max {st.max:.0f}"))
    if s.empty_captions:
        rows.append(("empty captions", str(s.empty_captions)))
    if s.scored or s.unscored:
        rows.append(("quality scores", f"{s.scored} scored, {s.unscored} without version-{QUALITY_VERSION} scores"
                     + (" (add them with `cnc score`)" if s.unscored else "")))
    t = s.throughput
    if t.samples_per_second is not None:
        rows.append(("throughput", f"{t.samples_per_second:.2f} samples/s per worker "
                                   f"({_duration(t.seconds)} of worker time over {t.shards_with_stats} shards)"))
        total = sum(t.stage_seconds.values())
        if total > 0:
            rows.append(("time by stage", ", ".join(f"{k} {v / total:.0%}" for k, v in
                                                     sorted(t.stage_seconds.items(), key=lambda kv: -kv[1]))))
    if validation is not None:
        status = "OK" if validation.ok else f"{validation.error_count} errors"
        warn = validation.problem_count - validation.error_count
        rows.append(("validation", status + (f", {warn} warnings" if warn else "")))
    return rows


def histogram_rows(summary: Summary, width: int = 30) -> list[tuple[str, int, str]]:
    """Mask-area histogram as ``(bin label, count, bar)`` rows."""
    h = summary.mask_area
    peak = max(h.counts) or 1
    return [(f"{lo:.0%}-{hi:.0%}", c, _BAR * round(c / peak * width))
            for lo, hi, c in zip(h.edges[:-1], h.edges[1:], h.counts)]


_SPARK = " ▁▂▃▄▅▆▇█"


def sparkline(counts: list[int]) -> str:
    """Counts → one block character per bin, scaled to the largest (empty bins are spaces)."""
    peak = max(counts) if counts else 0
    return "".join(_SPARK[0 if not c else max(1, round(c / peak * 8))] for c in counts) if peak else ""


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _threshold_position(sc, bins: int) -> float | None:
    """Where a score's shipped threshold falls on its histogram, in bins from the left (``None`` without one)."""
    if sc.threshold is None or sc.hi <= sc.lo:
        return None
    return min(max((sc.threshold - sc.lo) / (sc.hi - sc.lo) * bins, 0.0), float(bins))


def quality_rows(summary: Summary) -> list[tuple[str, str, str, str, str, str]]:
    """``(score, n, mean, min..max, histogram over [lo, hi], good end)`` per score with values; the shipped
    threshold is drawn into the histogram as ``┃`` and named in the last column (``high, keep >= 0.5``)."""
    rows = []
    for name, st in summary.quality.items():
        if not st.stats.n and not st.undefined:
            continue
        sc = SCORES[name]
        n = str(st.stats.n) + (f" (+{st.undefined} undefined)" if st.undefined else "")
        good = {"high": "high", "low": "low"}.get(sc.better, "-")
        spark = sparkline(st.hist.counts).ljust(len(st.hist.counts)) if st.stats.n else ""
        pos = _threshold_position(sc, len(st.hist.counts))
        if pos is not None and spark:
            spark = spark[:round(pos)] + "┃" + spark[round(pos):]
            good += f", keep {sc.keep_op} {sc.threshold:g}"
        rows.append((name, n, _fmt(st.stats.mean), f"{_fmt(st.stats.min)}..{_fmt(st.stats.max)}",
                     f"{sc.lo:g} |{spark}| {sc.hi:g}", good))
    return rows


def bin_rows(st: ScoreStats, width: int = 30, score: str | None = None) -> list[tuple[str, int | str, str, str]]:
    """``(bin, count, bar, share of samples below the bin's upper edge)`` of one score's histogram: the share is what
    a ``min`` threshold at that edge would remove. With ``score``, its shipped threshold is drawn as a row of its own
    where it falls (``("shipped threshold >= 0.5", "", "┄┄┄", "41% removed")``; ``≈`` when it falls inside a bin)."""
    peak, total, below = max(st.hist.counts) or 1, sum(st.hist.counts) or 1, 0
    sc = SCORES[score] if score is not None else None
    pos = _threshold_position(sc, len(st.hist.counts)) if sc is not None else None
    out = []
    for i, (lo, hi, c) in enumerate(zip(st.hist.edges[:-1], st.hist.edges[1:], st.hist.counts)):
        if pos is not None and i <= pos < i + 1:
            exact = pos == i
            removed = (below if sc.keep_op == ">=" else total - below) / total if exact else \
                (below + c * (pos - i) if sc.keep_op == ">=" else total - below - c * (pos - i)) / total
            out.append((f"shipped threshold {sc.keep_op} {sc.threshold:g}", "", "┄" * width,
                        f"{'' if exact else '≈'}{removed:.0%} removed"))
        below += c
        out.append((f"{lo:.2f} – {hi:.2f}", c, _BAR * round(c / peak * width), f"{below / total:.0%}"))
    if pos is not None and pos >= len(st.hist.counts):
        out.append((f"shipped threshold {sc.keep_op} {sc.threshold:g}", "", "┄" * width,
                    f"{(1.0 if sc.keep_op == '>=' else 0.0):.0%} removed"))
    return out


def print_report(result: InspectResult, console=None) -> None:
    """Summary, failure reasons and mask-area histogram as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="Shards", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in summary_rows(result.summary, result.validation):
        table.add_row(label, value)
    console.print(table)
    if result.summary.failures:
        fail = Table(title="Failures by reason")
        fail.add_column("stage: reason")
        fail.add_column("items", justify="right")
        for reason, n in sorted(result.summary.failures.items(), key=lambda kv: -kv[1]):
            fail.add_row(reason, str(n))
        console.print(fail)
    if result.summary.mask_area_stats.n:
        hist = Table(title="Mask area")
        hist.add_column("area")
        hist.add_column("samples", justify="right")
        hist.add_column("")
        for label, n, bar in histogram_rows(result.summary):
            hist.add_row(label, str(n), bar)
        console.print(hist)
    rows = quality_rows(result.summary)
    if rows:
        q = Table(title="Quality scores (10 bins each; details in index.html / summary.json)")
        for col, just in (("score", "left"), ("samples", "right"), ("mean", "right"), ("range", "right"),
                          ("histogram", "left"), ("good", "left")):
            q.add_column(col, justify=just, no_wrap=col in ("score", "histogram"))
        for row in rows:
            q.add_row(*row)
        console.print(q)


def html_report(result: InspectResult, *, tile: int | None = None, cmap: str = "viridis", where=(),
                title: str = "cnc inspect") -> str:
    """A self-contained HTML page (:func:`triplets.inspect.html.render_html`); ``where``: filter conditions
    (:class:`triplets.quality.Condition` or ``"removal>=0.5"`` strings) drawn on the histograms."""
    from triplets.inspect.html import render_html
    from triplets.inspect.svg import Threshold
    from triplets.quality_filter import parse_where

    thresholds: dict[str, list[Threshold]] = {}
    for name, sc in SCORES.items():  # the shipped thresholds (docs/build.md, "Quality scores"), then --where
        if sc.threshold is not None:
            thresholds.setdefault(name, []).append(Threshold(sc.keep_op, sc.threshold, "shipped"))
    for c in where:
        c = parse_where(c) if isinstance(c, str) else c
        thresholds.setdefault(c.score, []).append(Threshold(c.op, c.value))
    return render_html(result, summary_rows=summary_rows(result.summary, result.validation), tile=tile, cmap=cmap,
                       thresholds=thresholds, title=title)


def summary_dict(result: InspectResult) -> dict:
    """The machine-readable summary (``summary.json``, ``cnc inspect --json``)."""
    v = result.validation
    return {"ok": v.ok, "shards": len(v.shards), "samples": v.nsamples, "problem_count": v.problem_count,
            "error_count": v.error_count, "problems": [str(p) for p in v.problems],
            "summary": result.summary.to_dict(), "shown": [s.key for s in result.samples],
            "worst": {name: [{"key": s.key, "value": value} for value, s in items]
                      for name, items in result.worst.items()},
            "missing_keys": list(result.missing_keys)}


def write_report(result: InspectResult, out_dir: str | Path, *, html: bool = False, per_page: int = 8,
                 tile: int | None = None, cmap: str = "viridis", where=(), title: str = "cnc inspect") -> ReportFiles:
    """Write contact sheets, ``summary.json``, ``problems.txt`` and optionally ``index.html`` (see module docstring;
    ``where``: the filter conditions the HTML draws on its histograms)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles()
    for i, sheet in enumerate(contact_sheets(result.samples, per_page=per_page, tile=tile, cmap=cmap)):
        path = out / f"contact_sheet_{i:03d}.png"
        sheet.save(path, optimize=True)
        files.sheets.append(path)
    for name, items in result.worst.items():
        if not items:
            continue
        sheet = contact_sheet([s for _, s in items], tile=tile, cmap=cmap,
                              labels=[f"{name} {value:.3f}" for value, _ in items])
        path = out / f"worst_{name}.png"
        sheet.save(path, optimize=True)
        files.worst.append(path)
    v = result.validation
    data = summary_dict(result)
    files.summary_json = out / "summary.json"
    files.summary_json.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if v.problems:
        files.problems_txt = out / "problems.txt"
        files.problems_txt.write_text("\n".join(map(str, v.problems)) + "\n", encoding="utf-8")
    if html:
        files.html = out / "index.html"
        files.html.write_text(html_report(result, tile=tile, cmap=cmap, where=where, title=title), encoding="utf-8")
    return files

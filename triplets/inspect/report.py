"""Present an :class:`~triplets.inspect.validate.InspectResult`: rich tables, files, a self-contained HTML page.

:func:`write_report` writes into ``out_dir``::

    contact_sheet_000.png ...   one sheet per page of samples (see triplets.inspect.render)
    summary.json                Summary.to_dict(), validation counts, every kept problem line, sample keys
    problems.txt                one line per problem (only when there are any)
    worst_<score>.png           the worst-k samples of each quality score (``worst`` > 0), worst first
    index.html                  with html=True: summary, quality histograms, problems, the worst-k samples and one
                                row per sample with its json, images embedded as base64 data URIs, no external
                                references
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from triplets.inspect.render import COLUMNS, colorize, contact_sheet, contact_sheets, default_tile, sample_tiles
from triplets.inspect.summary import ScoreStats, Summary, depth_margin
from triplets.inspect.validate import InspectResult, ValidationResult
from triplets.quality import QUALITY_VERSION, SCORES, quality_summary_line

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


def _data_uri(img: Image.Image | np.ndarray) -> str:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _row_strip(tiles: list[np.ndarray], tile: int, gap: int = 4) -> Image.Image:
    strip = Image.new("RGB", (len(tiles) * tile + (len(tiles) - 1) * gap, tile), (255, 255, 255))
    for i, arr in enumerate(tiles):
        im = Image.fromarray(arr)
        if im.size != (tile, tile):
            im = im.resize((tile, tile), Image.BILINEAR)
        strip.paste(im, (i * (tile + gap), 0))
    return strip


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}.bad{color:#b00}
.cols{display:flex;gap:4px}.cols span{display:inline-block;font-size:12px}pre{font-size:11px;max-width:60em;
white-space:pre-wrap}.sample{margin-bottom:1.2em}.meta{font-size:13px}"""


def html_report(result: InspectResult, *, tile: int | None = None, cmap: str = "viridis") -> str:
    """A self-contained HTML page (inline CSS, images as data URIs): summary, problems, one row per sample."""
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>cnc inspect</title>",
             f"<style>{_CSS}</style></head><body><h1>cnc inspect</h1><h2>Summary</h2><table>"]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary_rows(result.summary, result.validation)]
    parts.append("</table>")
    if result.summary.failures:
        parts.append("<h2>Failures by reason</h2><table><tr><th>stage: reason</th><th>items</th></tr>")
        parts += [f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in
                  sorted(result.summary.failures.items(), key=lambda kv: -kv[1])]
        parts.append("</table>")
    if result.summary.mask_area_stats.n:
        parts.append("<h2>Mask area</h2><table><tr><th>area</th><th>samples</th><th></th></tr>")
        parts += [f"<tr><td>{e(a)}</td><td>{n}</td><td>{bar}</td></tr>" for a, n, bar in histogram_rows(result.summary)]
        parts.append("</table>")
    if quality_rows(result.summary):
        parts.append("<h2>Quality scores</h2><p>Each table is one score's histogram; <i>below</i> is the share of "
                     "scored samples under the bin's upper edge, i.e. what <code>--where 'SCORE&gt;=EDGE'</code> "
                     "would remove (for a low-is-good score, <code>SCORE&lt;=EDGE</code> removes the rest).</p>")
        for name, st in result.summary.quality.items():
            if not st.stats.n:
                continue
            sc = SCORES[name]
            good = {"high": "higher is better", "low": "lower is better"}.get(sc.better, "no good end")
            parts.append(f"<h3 id='q-{e(name)}'>{e(name)}</h3><p>{e(sc.doc)} ({good}); mean "
                         f"{_fmt(st.stats.mean)}, {st.stats.n} samples"
                         + (f", {st.undefined} undefined" if st.undefined else "") + "</p>"
                         "<table><tr><th>bin</th><th>samples</th><th></th><th>below</th></tr>")
            parts += [f"<tr><td>{e(b)}</td><td>{c}</td><td>{bar}</td><td>{below}</td></tr>"
                      for b, c, bar, below in bin_rows(st, score=name)]
            parts.append("</table>")
    if result.worst:
        size_w = tile or default_tile(next(iter(result.worst.values()))[0][1].image.shape[0])
        parts.append("<h2>Worst samples per score</h2>")
        for name, items in result.worst.items():
            parts.append(f"<h3>worst {len(items)} by {e(name)}</h3>")
            for value, s in items:
                strip = _data_uri(_row_strip(sample_tiles(s, cmap), size_w))
                parts.append(f"<div class='sample'><img src='{strip}' alt='{e(s.key)}'><div class='meta'>"
                             f"<b class='bad'>{e(name)} {value:.3f}</b> · <b>{e(s.key)}</b> · "
                             f"{e(quality_summary_line(s.meta))}<br>{e(s.caption)}</div></div>")
    v = result.validation
    parts.append(f"<h2>Problems ({v.problem_count})</h2>")
    if v.problems:
        parts.append("<pre>" + "\n".join(e(str(p)) for p in v.problems) + "</pre>")
    size = tile or default_tile(result.samples[0].image.shape[0] if result.samples else 128)
    ramp = colorize(np.tile(np.linspace(0, 1, 2 * size), (10, 1)), cmap)
    parts.append(f"<h2>Samples ({len(result.samples)})</h2><p>depth columns: normalised disparity "
                 f"0 (far) <img src='{_data_uri(ramp)}' alt='colour scale'> 1 (near)</p><div class='cols'>")
    parts += [f"<span style='width:{size}px'>{e(c)}</span>" for c in COLUMNS]
    parts.append("</div>")
    for s in result.samples:
        margin = depth_margin(s)
        order = "empty mask" if margin is None else f"fg-bg depth in M {margin:+.3f}"
        cls = " class='bad'" if margin is None or margin <= 0 else ""
        strip = _data_uri(_row_strip(sample_tiles(s, cmap), size))
        parts.append(f"<div class='sample' id='{e(s.key)}'><img src='{strip}' alt='{e(s.key)}'>"
                     f"<div class='meta'><b>{e(s.key)}</b> · mask {s.mask.mean():.1%} · "
                     f"<span{cls}>{order}</span> · {e(quality_summary_line(s.meta))}<br>{e(s.caption)}</div>"
                     "<details><summary>json</summary><pre>"
                     f"{e(json.dumps(s.meta, indent=1, sort_keys=True, ensure_ascii=False))}</pre></details></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


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
                 tile: int | None = None, cmap: str = "viridis") -> ReportFiles:
    """Write contact sheets, ``summary.json``, ``problems.txt`` and optionally ``index.html`` (see module docstring)."""
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
        files.html.write_text(html_report(result, tile=tile, cmap=cmap), encoding="utf-8")
    return files

"""The layout of ``cnc inspect --html``: one compact, navigable, self-contained page.

Sections, linked from a table of contents at the top: summary, failures by reason, small side-by-side SVG histograms
(mask area, fg − bg depth margin, every quality score; the ``--where`` thresholds drawn on them with the share each
removes), the worst samples (each sample once, with the scores it is among the worst of), problems, and the shown
samples. Sample rows are tables with titled columns (I, M over I, I_f, I_b, fg depth, bg depth) of JPEG thumbnails
embedded as data URIs; no external reference. The histogram drawing lives in :mod:`triplets.inspect.svg` and the
numbers in :mod:`triplets.inspect.report` / :mod:`triplets.inspect.summary`; this module only lays them out.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence

import numpy as np
from PIL import Image

from triplets.inspect.render import _ANCHORS, COLUMNS, sample_tiles
from triplets.inspect.summary import depth_margin
from triplets.inspect.svg import Threshold, svg_histogram
from triplets.quality import SCORES, quality_summary_line

#: Side of the HTML thumbnails in pixels (JPEG; the PNG contact sheets keep full detail).
THUMB = 96
JPEG_QUALITY = 75

_CSS = """body{font-family:system-ui,sans-serif;margin:0 1.5em 2em;color:#222;font-size:14px}
nav{position:sticky;top:0;background:#f6f6f6;border-bottom:1px solid #ccc;padding:6px 0;margin:0 -1.5em 1em;
padding-left:1.5em;z-index:1}nav a{margin-right:1.2em;text-decoration:none;color:#24c}
h1{font-size:20px;margin:.6em 0 .2em}h2{font-size:16px;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.3em 0 1em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;
vertical-align:top}th{background:#fafafa;font-weight:600}.bad{color:#b00}.grid{display:flex;flex-wrap:wrap;gap:6px}
.grid figure{margin:0;border:1px solid #eee;padding:2px}td.t{padding:1px}td.t img{display:block}
.info{max-width:22em;font-size:12px}pre{font-size:11px;max-width:60em;white-space:pre-wrap;margin:0}
.scale{display:inline-block;width:160px;height:10px;vertical-align:middle;margin:0 4px}
table.samples th.c{width:""" + str(THUMB) + """px;font-size:12px}"""


def jpeg_uri(arr: np.ndarray, size: int = THUMB, quality: int = JPEG_QUALITY) -> str:
    """A ``(H, W, 3)`` uint8 tile as a ``size``-px JPEG data URI."""
    img = Image.fromarray(arr).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _gradient(cmap: str) -> str:
    stops = ",".join(f"rgb{tuple(c)}" for c in _ANCHORS[cmap])
    return f"background:linear-gradient(to right,{stops})"


def _tile_cells(sample, cmap: str, size: int) -> str:
    e = html.escape
    return "".join(f"<td class='t'><img src='{jpeg_uri(t, size)}' width='{size}' height='{size}' "
                   f"alt='{e(sample.key)}: {e(col)}' title='{e(col)}'></td>"
                   for col, t in zip(COLUMNS, sample_tiles(sample, cmap)))


def _column_headers(first: str, extra: Sequence[str] = ()) -> str:
    e = html.escape
    return ("<tr>" + f"<th>{e(first)}</th>" + "".join(f"<th>{e(x)}</th>" for x in extra)
            + "".join(f"<th class='c'>{e(c)}</th>" for c in COLUMNS) + "</tr>")


def _histograms(result, thresholds: dict[str, list[Threshold]]) -> list[str]:
    s = result.summary
    figs = []
    if s.mask_area_stats.n:
        h = s.mask_area
        figs.append(svg_histogram(h.edges, h.counts, title="mask area", mean=s.mask_area_stats.mean,
                                  thresholds=thresholds.get("mask_area", [])))
    if s.depth_order.n:
        h = s.depth_order.margin
        figs.append(svg_histogram(h.edges, h.counts, title="fg−bg depth in M", better="high"))
    for name, st in s.quality.items():
        if not st.stats.n:
            continue
        if name == "mask_area" and s.mask_area_stats.n:
            continue  # drawn above
        figs.append(svg_histogram(st.hist.edges, st.hist.counts, title=name, mean=st.stats.mean,
                                  better=SCORES[name].better, thresholds=thresholds.get(name, [])))
    return [f"<figure>{f}</figure>" for f in figs]


def _worst_rows(worst: dict, cmap: str, size: int) -> list[str]:
    """One row per distinct sample among the worst of any score, with the scores (and values) it is worst in."""
    e = html.escape
    seen: dict[str, tuple[object, list[str]]] = {}
    for name, items in worst.items():
        for value, s in items:
            seen.setdefault(s.key, (s, []))[1].append(f"{name} {value:.3f}")
    order = sorted(seen, key=lambda k: -len(seen[k][1]))
    rows = []
    for key in order:
        s, why = seen[key]
        rows.append(f"<tr><td class='info'><b>{e(key)}</b><br><span class='bad'>{e(', '.join(why))}</span><br>"
                    f"{e(s.caption[:200])}</td>{_tile_cells(s, cmap, size)}</tr>")
    return rows


def render_html(result, *, summary_rows: list[tuple[str, str]], tile: int | None = None, cmap: str = "viridis",
                thresholds: dict[str, list[Threshold]] | None = None, title: str = "cnc inspect") -> str:
    """The page (see the module docstring). ``summary_rows``: the ``(label, value)`` rows of the summary table
    (:func:`triplets.inspect.report.summary_rows`); ``thresholds``: score name → conditions to draw."""
    e = html.escape
    size = min(tile or THUMB, 160)
    thresholds = thresholds or {}
    s, v = result.summary, result.validation
    sections: list[tuple[str, str, str]] = []  # (id, heading, body)
    sections.append(("summary", "Summary", "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(val)}</td></tr>"
                                                               for k, val in summary_rows) + "</table>"))
    if s.failures:
        body = "<table><tr><th>stage: reason</th><th>items</th></tr>" + "".join(
            f"<tr><td>{e(k)}</td><td>{n}</td></tr>" for k, n in sorted(s.failures.items(), key=lambda kv: -kv[1]))
        sections.append(("failures", f"Failures by reason ({sum(s.failures.values())})", body + "</table>"))
    figs = _histograms(result, thresholds)
    if figs:
        drawn = [(n, t) for n, ts in thresholds.items() for t in ts]
        shipped = ", ".join(f"{n}{t.op}{t.value:g}" for n, t in drawn if t.source == "shipped")
        where = ", ".join(f"{n}{t.op}{t.value:g}" for n, t in drawn if t.source != "shipped")
        note = ("<p>Dashed lines: filter thresholds, the side each removes shaded, with the share of samples it "
                "removes (≈: read from the bins). "
                + (f"Shipped thresholds (<code>cnc filter --recommended</code>): <code>{e(shipped)}</code>. "
                   if shipped else "")
                + (f"<code>--where</code>: <code>{e(where)}</code>. " if where else
                   "Add your own with <code>--where 'SCORE&gt;=VALUE'</code> (as for <code>cnc filter</code>). ")
                + "Triangle: the mean.</p>")
        sections.append(("histograms", "Histograms", note + "<div class='grid'>" + "".join(figs) + "</div>"))
    if result.worst:
        rows = _worst_rows(result.worst, cmap, size)
        k = max(len(items) for items in result.worst.values())
        body = (f"<p>The {k} worst samples of each quality score, each sample once ({len(rows)} distinct), with the "
                "scores it is among the worst of.</p><table class='samples'>" + _column_headers("sample, worst in")
                + "".join(rows) + "</table>")
        sections.append(("worst", f"Worst samples ({len(rows)})", body))
    problems = ("<pre>" + "\n".join(e(str(p)) for p in v.problems) + "</pre>") if v.problems else "<p>none</p>"
    sections.append(("problems", f"Problems ({v.problem_count})", problems))
    rows = []
    for smp in result.samples:
        margin = depth_margin(smp)
        order = "empty mask" if margin is None else f"fg−bg depth in M {margin:+.3f}"
        cls = " class='bad'" if margin is None or margin <= 0 else ""
        meta = e(json.dumps(smp.meta, indent=1, sort_keys=True, ensure_ascii=False))
        rows.append(f"<tr id='s-{e(smp.key)}'><td class='info'><b>{e(smp.key)}</b><br>mask {smp.mask.mean():.1%} · "
                    f"<span{cls}>{order}</span><br>{e(quality_summary_line(smp.meta))}<br>{e(smp.caption[:300])}"
                    f"<details><summary>json</summary><pre>{meta}</pre></details></td>"
                    f"{_tile_cells(smp, cmap, size)}</tr>")
    scale = (f"<p>Depth columns: normalised disparity 0 (far) <span class='scale' style='{_gradient(cmap)}'></span> "
             "1 (near); the mask outline drawn in white.</p>")
    sections.append(("samples", f"Samples ({len(result.samples)})",
                     scale + "<table class='samples'>" + _column_headers("sample") + "".join(rows) + "</table>"))
    toc = "".join(f"<a href='#{sid}'>{e(head)}</a>" for sid, head, _ in sections)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width,initial-scale=1'>",
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
             f"<nav id='toc'>{toc}</nav><h1>{e(title)}</h1>"]
    parts += [f"<section id='{sid}'><h2>{e(head)}</h2>{body}</section>" for sid, head, body in sections]
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["THUMB", "jpeg_uri", "render_html"]

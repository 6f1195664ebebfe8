"""Small inline SVG histograms for the HTML report (no plotting library, no external file).

:func:`svg_histogram` draws counts over fixed bins with the axis range, the largest count, the mean and any filter
thresholds (a dashed line at the value, the side it removes shaded, and the share of samples it would remove, read
from the histogram). Every bar has a tooltip with its range and count.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

BAR, BAR_REMOVED, THRESHOLD, MEAN = "#5b7db1", "#d9a3a3", "#b00020", "#222"


@dataclass(frozen=True)
class Threshold:
    """A filter condition drawn on a histogram: ``op`` (``>=``, ``>``, ``<=``, ``<``, ``==``, ``!=``) and ``value``,
    as in ``cnc filter --where`` / the trainer's ``data.filter``; ``source``: ``shipped`` (the score's shipped
    threshold) or ``--where`` (the user's)."""

    op: str
    value: float
    source: str = "--where"

    def keeps_above(self) -> bool | None:
        """``True`` when the condition keeps values above the line, ``False`` below, ``None`` neither (``==``)."""
        return {">=": True, ">": True, "<=": False, "<": False}.get(self.op)


def removed_share(edges: Sequence[float], counts: Sequence[int], t: Threshold) -> float | None:
    """The share of the histogram's samples a threshold removes, assuming values spread evenly inside each bin
    (exact when the threshold is a bin edge). ``None`` for ``==`` / ``!=`` or an empty histogram."""
    total, above = sum(counts), t.keeps_above()
    if not total or above is None:
        return None
    below = 0.0
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        if hi <= t.value:
            below += c
        elif lo < t.value:
            below += c * (t.value - lo) / (hi - lo)
    return (below if above else total - below) / total


def svg_histogram(edges: Sequence[float], counts: Sequence[int], *, title: str, thresholds: Sequence[Threshold] = (),
                  mean: float | None = None, better: str = "", width: int = 230, height: int = 130) -> str:
    """An inline ``<svg>`` histogram.

    Args:
        edges / counts: bin edges (``len(counts) + 1``) and counts.
        title: drawn at the top (escaped).
        thresholds: filter conditions drawn as dashed lines; the side each removes is shaded and labelled with the
            share it removes (:func:`removed_share`).
        mean: drawn as a small triangle under the axis.
        better: ``high`` / ``low``: an arrow saying which end is good.
    """
    e = html.escape
    left, right, top, bottom = 6, 6, 18, 18 + 11 * max(2, len(thresholds))
    height = max(height, 70 + bottom)
    pw, ph = width - left - right, height - top - bottom
    lo, hi = float(edges[0]), float(edges[-1])
    peak = max(counts) if counts else 0

    def x(v: float) -> float:
        return left + (min(max(v, lo), hi) - lo) / (hi - lo) * pw if hi > lo else left

    parts = [f"<svg width='{width}' height='{height}' role='img' "
             f"class='hist' aria-label='{e(title)}'>",
             f"<text x='{left}' y='12' font-size='12' font-weight='bold'>{e(title)}</text>"]
    if better in ("high", "low"):
        parts.append(f"<text x='{width - right}' y='12' font-size='10' text-anchor='end' fill='#555'>"
                     f"{'better →' if better == 'high' else '← better'}</text>")
    for t in thresholds:  # shade the removed side first, bars over it
        above = t.keeps_above()
        if above is None:
            continue
        x0, x1 = (left, x(t.value)) if above else (x(t.value), left + pw)
        parts.append(f"<rect x='{x0:.1f}' y='{top}' width='{max(0.0, x1 - x0):.1f}' height='{ph}' "
                     f"fill='{BAR_REMOVED}' fill-opacity='0.35'/>")
    n = len(counts)
    for i, c in enumerate(counts):
        if not c:
            continue
        bx, bw = x(edges[i]), x(edges[i + 1]) - x(edges[i])
        bh = c / peak * ph
        parts.append(f"<rect x='{bx + 0.5:.1f}' y='{top + ph - bh:.1f}' width='{max(bw - 1, 1):.1f}' "
                     f"height='{bh:.1f}' fill='{BAR}'><title>{edges[i]:.3g} – {edges[i + 1]:.3g}: {c}"
                     f"</title></rect>")
    axis_y = top + ph
    parts.append(f"<line x1='{left}' y1='{axis_y}' x2='{left + pw}' y2='{axis_y}' stroke='#888'/>")
    parts.append(f"<text x='{left}' y='{axis_y + 12}' font-size='10'>{lo:g}</text>"
                 f"<text x='{left + pw}' y='{axis_y + 12}' font-size='10' text-anchor='end'>{hi:g}</text>"
                 f"<text x='{left + pw / 2:.1f}' y='{axis_y + 12}' font-size='9' text-anchor='middle' "
                 f"fill='#555'>{n} bins, max {peak}</text>")
    if mean is not None:
        mx = x(mean)
        parts.append(f"<path d='M{mx:.1f},{axis_y + 1} l-4,6 h8 z' fill='{MEAN}'><title>mean {mean:.3g}</title>"
                     "</path>")
    for k, t in enumerate(thresholds):
        tx = x(t.value)
        share = removed_share(edges, counts, t)
        shipped = t.source == "shipped"
        label = (("shipped " if shipped else "--where ") + f"{t.op}{t.value:g}"
                 + ("" if share is None else f": removes ≈{share:.0%}"))
        dash, cls = ("2 2", "shipped") if shipped else ("5 2", "where")
        parts.append(f"<line x1='{tx:.1f}' y1='{top - 2}' x2='{tx:.1f}' y2='{axis_y}' stroke='{THRESHOLD}' "
                     f"stroke-dasharray='{dash}' stroke-width='1.5' class='threshold {cls}'/>"
                     f"<line x1='{left}' y1='{axis_y + 21 + 11 * k}' x2='{left + 12}' y2='{axis_y + 21 + 11 * k}' "
                     f"stroke='{THRESHOLD}' stroke-dasharray='{dash}' stroke-width='1.5'/>"
                     f"<text x='{left + 16}' y='{axis_y + 25 + 11 * k}' font-size='10' fill='{THRESHOLD}'>"
                     f"{e(label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["Threshold", "removed_share", "svg_histogram"]

"""The quality histograms of `cnc inspect` with each score's shipped threshold drawn where it falls."""

from __future__ import annotations

from triplets.inspect.report import bin_rows, quality_rows
from triplets.inspect.summary import ScoreStats, Summary
from triplets.quality import QUALITY_VERSION, SCORES


def _stats(name: str, values: list[float]) -> ScoreStats:
    st = ScoreStats.for_score(name)
    for v in values:
        st.add(v)
    return st


def test_bin_rows_draw_the_shipped_threshold_with_the_share_it_removes():
    values = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]  # one per bin
    t = SCORES["removal"].threshold  # on a bin edge (0.5): the share is exact
    rows = bin_rows(_stats("removal", values), score="removal")
    marks = [r for r in rows if r[0].startswith("shipped threshold")]
    assert len(rows) == 11 and marks == [(f"shipped threshold >= {t:g}", "", "┄" * 30,
                                          f"{sum(v < t for v in values) / 10:.0%} removed")]
    assert rows.index(marks[0]) == sum(v < t for v in values)  # between the bins below and above it
    assert len(bin_rows(_stats("removal", values))) == 10  # without a score name: the plain histogram
    # a low-is-good score removes what lies above its threshold; inside a bin the share is interpolated (≈)
    c = SCORES["removal_contrast"].threshold
    row = next(r for r in bin_rows(_stats("removal_contrast", [0.1, 0.9]), score="removal_contrast")
               if r[0].startswith("shipped"))
    assert row[0] == f"shipped threshold <= {c:g}" and row[3] == "50% removed"
    margin = next(r for r in bin_rows(_stats("depth_margin", [-0.5, 0.01, 0.09, 0.5]), score="depth_margin")
                  if r[0].startswith("shipped"))  # 0.05 halves the bin 0.0-0.2 holding two of the four
    assert margin[3] == f"≈{(1 + 2 * SCORES['depth_margin'].threshold / 0.2) / 4:.0%} removed"
    assert SCORES["mask_area"].threshold is None
    assert not [r for r in bin_rows(_stats("mask_area", values), score="mask_area") if r[1] == ""]


def test_quality_rows_draw_the_threshold_into_the_sparkline():
    s = Summary()
    for v in (0.1, 0.2, 0.9):
        s.add_quality({"quality": {"version": QUALITY_VERSION, "removal": {"score": v}}})
    row = next(r for r in quality_rows(s) if r[0] == "removal")
    t = SCORES["removal"].threshold
    hist = row[4]
    assert hist.startswith("0 |") and hist.endswith("| 1") and hist.index("┃") == len("0 |") + round(t * 10)
    assert row[5] == f"high, keep >= {t:g}"

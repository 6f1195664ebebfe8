"""The HTML report of ``cnc inspect --html``: compact, navigable, self-contained; histograms with the filter thresholds
and the share each removes; the worst samples once each, under column headers; looked at in headless Chromium when it
is installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from cnc.cli import app
from tests.triplets.inspect.test_inspect import make_sample
from triplets.inspect.svg import Threshold, removed_share, svg_histogram
from triplets.quality import QUALITY_VERSION, SCORES
from triplets.shardio import write_shard

N = 10


def _scored(i: int):
    """Sample ``i`` with removal = i / 10 (so ``removal>=0.5`` removes exactly 5 of 10) and depth_order = 1 - i/10."""
    s = make_sample(f"k{i:02d}", i)
    s.meta["quality"] = {"version": QUALITY_VERSION,
                         "removal": {"score": i / N, "changed": 1.0, "contrast": 0.0, "clip_sim": 0.5},
                         "depth": {"order": 1 - i / N, "margin": 0.1},
                         "mask": {"area": float(s.mask.mean()), "components": 1, "border": 0.0, "bbox_fill": 0.8}}
    return s


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``cnc inspect --html --where ...`` of a 10-sample build in 2 shards (worst 3 per score)."""
    root = tmp_path_factory.mktemp("html")
    build = root / "build"
    build.mkdir()
    samples = [_scored(i) for i in range(N)]
    write_shard(build / "000000.tar", samples[:5])
    write_shard(build / "000001.tar", samples[5:])
    res = CliRunner().invoke(app, ["inspect", str(build), "--n", str(N), "--html", "--worst", "3", "--where",
                                   "removal>=0.5", "--where", "depth_order>=0.8"])
    assert res.exit_code == 0, res.output
    page = build / "_cnc" / "inspect" / "index.html"  # reports under _cnc/: the folder stays a dataset
    assert sorted(p.name for p in build.iterdir()) == ["000000.tar", "000001.tar", "_cnc"]
    return page


def test_removed_share_known_answers():
    edges, counts = [i / 10 for i in range(11)], [1] * 10
    assert removed_share(edges, counts, Threshold(">=", 0.5)) == pytest.approx(0.5)
    assert removed_share(edges, counts, Threshold("<=", 0.3)) == pytest.approx(0.7)
    assert removed_share(edges, counts, Threshold(">=", 0.55)) == pytest.approx(0.55)  # half a bin, spread evenly
    assert removed_share(edges, counts, Threshold("==", 0.5)) is None
    svg = svg_histogram(edges, counts, title="removal", thresholds=[Threshold(">=", 0.5)], better="high")
    assert svg.startswith("<svg") and svg.count("class='threshold where'") == 1 and "removes ≈50%" in svg
    shipped = svg_histogram(edges, counts, title="removal", thresholds=[Threshold(">=", 0.5, "shipped")])
    assert "class='threshold shipped'" in shipped and "shipped &gt;=0.5: removes ≈50%" in shipped


def test_page_is_compact_navigable_and_self_contained(report):
    page = report.read_text()
    # 13 rows of six JPEG thumbnails of random noise (JPEG's worst case; photos take a third of it)
    assert report.stat().st_size < 500_000
    assert "http://" not in page and "https://" not in page
    toc = re.search(r"<nav id='toc'>(.*?)</nav>", page).group(1)
    targets = re.findall(r"href='#([^']+)'", toc)
    assert targets == ["summary", "histograms", "worst", "problems", "samples"]
    assert all(f"<section id='{t}'>" in page for t in targets)
    srcs = re.findall(r"<img src='([^']{0,30})", page)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert len(srcs) == 6 * (N + len(_worst_keys(report)))  # six tiles per shown sample and per distinct worst one
    # histograms: one per score with values (+ mask area and the depth margin); the --where thresholds and every
    # shipped threshold (docs/build.md, "Quality scores") drawn
    shipped = sum(sc.threshold is not None for sc in SCORES.values())
    assert page.count("<svg") == 11 and page.count("class='threshold where'") == 2
    assert page.count("class='threshold shipped'") == shipped
    assert "--where &gt;=0.5: removes ≈50%" in page and "--where &gt;=0.8: removes ≈70%" in page  # keeps 1, .9, .8


def _worst_keys(report) -> set[str]:
    import json

    worst = json.loads((report.parent / "summary.json").read_text())["worst"]
    assert len(worst["removal"]) == 3  # --worst 3
    return {w["key"] for items in worst.values() for w in items}


def test_worst_samples_once_each_under_column_headers(report):
    page = report.read_text()
    worst = re.search(r"<section id='worst'>(.*?)</section>", page, re.S).group(1)
    keys = re.findall(r"<td class='info'><b>([^<]+)</b>", worst)
    assert len(keys) == len(set(keys)) == len(_worst_keys(report))  # each sample once, however many scores
    assert {"k00", "k01", "k02", "k09", "k08", "k07"} <= set(keys)  # worst removal (i/10), worst depth order (1-i/10)
    row = re.search(r"<b>k00</b><br><span class='bad'>([^<]+)</span>", worst).group(1)
    assert "removal 0.000" in row  # the scores a sample is among the worst of, with its values
    headers = re.findall(r"<th class='c'>([^<]+)</th>", worst)
    assert headers == ["I", "M over I", "I_f = I*M", "I_b (inpainted)", "fg depth", "bg depth"]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium not installed (apt-get install chromium); structural checks above run")
def test_page_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--hide-scrollbars", "--window-size=1100,1800", f"--screenshot={shot}",
                           report.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (1800, 1100)
    colourful = (img.max(axis=2) - img.min(axis=2)) > 60  # thumbnails and bars (the text is grey/black)
    assert colourful[:1800].mean() > 0.02
    assert (img[:40] < 200).any()  # the table of contents at the top

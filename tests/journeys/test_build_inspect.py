"""`cnc inspect` on shards from a real tiny build (tiny random models, 64 px, ~15 s with model loading)."""

import json
import time

import pytest
from PIL import Image
from typer.testing import CliRunner

from cnc.cli import app
from cnc.config import load_config
from tests.support import make_photo_folder
from triplets.builder import TripletBuilder
from triplets.config import BuildConfig
from triplets.inspect import SheetLayout, inspect_shards
from triplets.readers import read_items
from triplets.shardio import write_shard

R = 64


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    src = tmp_path_factory.mktemp("photos")
    make_photo_folder(src, 4, bad=("text",))  # 4 photos + a text file named .jpg
    cfg = load_config(BuildConfig, "configs/build/tiny.yaml",
                      [f"resolution={R}", "min_side=32", "inpaint.num_inference_steps=2"])
    builder = TripletBuilder(cfg)
    out = tmp_path_factory.mktemp("build")
    (out / "errors").mkdir()
    items = read_items(str(src))
    for i, chunk in enumerate((items[:3], items[3:])):
        t0 = time.perf_counter()
        samples, failures = builder(chunk)
        info = write_shard(out / f"{i:06d}.tar", samples)
        (out / "errors" / f"{i:06d}.jsonl").write_text("".join(json.dumps(f) + "\n" for f in failures))
        (out / f"{i:06d}_stats.json").write_text(json.dumps({**info, "seconds": time.perf_counter() - t0}))
    return out


def test_inspect_tiny_build(build, tmp_path, monkeypatch):
    rep = tmp_path / "rep"
    res = CliRunner().invoke(app, ["inspect", str(build), "--n", "16", "--html", "--output", str(rep)])
    assert res.exit_code == 0, res.output
    assert "fg nearer than bg in M" in res.output and "decode: not an image" in res.output
    data = json.loads((rep / "summary.json").read_text())
    assert data["ok"] and data["samples"] == 4 and data["summary"]["failed"] == 1
    sheet = Image.open(rep / "contact_sheet_000.png")
    assert sheet.size == SheetLayout(tile=96).size(4)  # all four samples, one row each
    page = (rep / "index.html").read_text()
    assert "https://" not in page and all(k in page for k in data["shown"])


def test_trainer_preflight_on_first_shard(build):
    result = inspect_shards(build, n=2, seed=0, max_shards=1)
    assert result.validation.ok and len(result.validation.shards) == 1
    assert len(result.samples) == 2 and all(s.image.shape == (R, R, 3) for s in result.samples)

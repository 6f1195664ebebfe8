"""``cnc eval``'s grid (every seed, titled columns), resume (images reused only under the same settings) and its
tracker report (TensorBoard events equal to the metrics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cnc_model.evaluation.run import EvalSettings, _generate_all, make_grid
from tests.cnc_model.evaluation.test_metrics import _samples


def test_grid_shows_every_seed_of_every_model_under_its_name():
    from triplets.inspect.grid import grid_geometry

    samples, seeds = _samples(3), [0, 5]
    colours = {"joint": 40, "global": 200}  # image of model m, seed k, sample i: value colours[m] + 10 k + i
    generated = {m: np.stack([np.full((64, 64, 3), v + 10 * k + i, np.uint8) for k in range(2) for i in range(3)])
                 for m, v in colours.items()}
    grid = make_grid(samples, generated, seeds, footer="2 steps")
    g = grid_geometry(["I (held out)", "fg depth", "bg depth", "mask M", "joint", "global"], 6, 64, footer="x")
    assert grid.size == g.size  # 3 samples x 2 seeds = 6 rows
    for i in range(3):
        for k in range(2):
            row = 2 * i + k  # a sample's seeds are adjacent rows
            assert np.array_equal(np.asarray(grid.crop(g.tile_box(row, 0))), samples[i].image)
            for c, (m, v) in enumerate(colours.items()):
                assert (np.asarray(grid.crop(g.tile_box(row, 4 + c))) == v + 10 * k + i).all(), (m, i, k)
            caption = np.asarray(grid.crop(g.caption_box(row)).convert("L"))
            assert (caption < 128).sum() > 20  # key, seed and prompt are written under the row
    for c in range(6):
        assert (np.asarray(grid.crop(g.header_box(c)).convert("L")) < 128).sum() > 5  # every column is titled


def test_grid_cuts_samples_not_seeds():
    from cnc_model.evaluation.run import GRID_ROWS

    samples, seeds = _samples(12), list(range(5))
    generated = {"m": np.zeros((60, 64, 64, 3), np.uint8)}
    rows = (make_grid(samples, generated, seeds).size[1])
    from triplets.inspect.grid import grid_geometry

    shown = GRID_ROWS // 5
    assert rows == grid_geometry(["I (held out)", "fg depth", "bg depth", "mask M", "m"], shown * 5, 64).size[1]


class _Counting:
    """The tiny pipeline, counting the images it generates."""

    def __init__(self, pipe):
        self.pipe, self.generated = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kw):
        self.generated += len(kw["prompt"])
        return self.pipe(**kw)


def test_resume_reuses_images_made_with_the_same_settings(tmp_path):
    from accelerate import PartialState

    from cnc_model.testing.tiny import tiny_cnc_pipeline

    samples = _samples(2)
    pipe = _Counting(tiny_cnc_pipeline())
    settings = EvalSettings(n=2, steps=1, seeds=[0, 1], batch_size=2, progress=False)
    record = settings.generation_record(samples, {"path": "joint"}, ["a.tar"])
    state = PartialState(cpu=True)
    first = _generate_all({"joint": pipe}, samples, settings, tmp_path, state, {"joint": record})["joint"]
    assert pipe.generated == 4 and first.shape == (4, 64, 64, 3)
    folder = tmp_path / "images" / "joint"
    assert json.loads((folder / "generation.json").read_text()) == record
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    # 1. the same settings: nothing generated, the same pixels read back
    again = _generate_all({"joint": pipe}, samples, settings, tmp_path, state, {"joint": record})["joint"]
    assert pipe.generated == 4 and np.array_equal(again, first)
    # 2. one image lost: only its batch (of 2) is generated again, and gives the same pixels
    (folder / "s1_s0.png").unlink()
    again = _generate_all({"joint": pipe}, samples, settings, tmp_path, state, {"joint": record})["joint"]
    assert pipe.generated == 6 and np.array_equal(again, first)
    assert sum(p.stat().st_mtime_ns != stamps[p.name] for p in folder.glob("*.png")) == 2
    # 3. other settings (guidance): every image again; --regenerate (resume=False): every image again
    other = EvalSettings(n=2, steps=1, seeds=[0, 1], batch_size=2, progress=False, guidance_scale=2.0)
    _generate_all({"joint": pipe}, samples, other, tmp_path, state,
                  {"joint": other.generation_record(samples, {"path": "joint"}, ["a.tar"])})
    assert pipe.generated == 10
    fresh = EvalSettings(n=2, steps=1, seeds=[0, 1], batch_size=2, progress=False, resume=False)
    _generate_all({"joint": pipe}, samples, fresh, tmp_path, state, {"joint": record})
    assert pipe.generated == 14


def test_tensorboard_report_holds_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cnc_model.evaluation.trackers import report_metrics

    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "grid.png")
    report = {"n": 4, "seeds": [0], "steps": 2, "models": {"joint": {"fid": 12.5, "clip_score": 0.25, "n": 4},
                                                           "global": {"fid": 30.0, "clip_score": None, "n": 4}}}
    logged = report_metrics(report, tmp_path, "tensorboard", step=7, steps={"joint": 7, "global": 3})
    assert logged == {"eval/joint/fid": 12.5, "eval/joint/clip_score": 0.25, "eval/global/fid": 30.0}
    acc = EventAccumulator(str(tmp_path / "logs" / "cnc-eval"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/joint/fid")] == [(7, 12.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/global/fid")] == [(3, 30.0)]
    assert "eval/grid" in acc.Tags()["images"]
    assert report_metrics(report, tmp_path / "none", "none", step=1) == {} and not (tmp_path / "none").exists()

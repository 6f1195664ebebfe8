"""The metrics of ``cnc eval`` on inputs with a known answer (tiny seeded metric networks, no network)."""

from __future__ import annotations

import numpy as np
import pytest

from cnc_model.evaluation import models as metric_models
from cnc_model.evaluation.metrics import METRICS, MetricSuite, depth_mae
from triplets.sample import TripletSample


def _samples(n: int = 4, size: int = 64) -> list[TripletSample]:
    rng = np.random.default_rng(0)
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        mask = ((yy - size / 2) ** 2 + (xx - size / 2 - 4 * i) ** 2 < (size / 4) ** 2).astype(np.uint8)
        depth = lambda k: (rng.random((size, size)) * 65535).astype(np.uint16)  # noqa: E731
        out.append(TripletSample(
            key=f"s{i}", image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mask=mask,
            background=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), fg_depth=depth(0), bg_depth=depth(1),
            fg_emb=np.zeros(32, np.float32), bg_emb=np.zeros(32, np.float32), caption=f"a lower tower {i}",
            meta={"fg_depth_range": [0, 1], "bg_depth_range": [0, 1]}))
    return out


def test_depth_mae_of_a_shifted_depth():
    rng = np.random.default_rng(1)
    fg, bg = rng.random((2, 16, 16)) * 0.8, rng.random((2, 16, 16)) * 0.8
    mask = np.zeros((2, 16, 16), np.uint8)
    mask[:, 4:12, 4:12] = 1
    target = np.where(mask > 0, fg, bg)
    assert depth_mae(target, fg, bg, mask) == pytest.approx({"depth_mae": 0, "depth_mae_fg": 0, "depth_mae_bg": 0})
    shifted = target + 0.1
    assert depth_mae(shifted, fg, bg, mask) == pytest.approx({"depth_mae": 0.1, "depth_mae_fg": 0.1,
                                                              "depth_mae_bg": 0.1})
    pred = np.where(mask > 0, fg + 0.2, bg - 0.05)  # fg region off by 0.2 (64 of 256 px), bg by 0.05
    got = depth_mae(pred, fg, bg, mask)
    assert got["depth_mae_fg"] == pytest.approx(0.2) and got["depth_mae_bg"] == pytest.approx(0.05)
    assert got["depth_mae"] == pytest.approx((64 * 0.2 + 192 * 0.05) / 256)


@pytest.fixture(scope="module")
def suite(tiny_metrics_cache):
    models = _tiny_models(tiny_metrics_cache)
    assert metric_models.check(models) == []
    return MetricSuite(models, batch_size=4)


def _tiny_models(cache) -> metric_models.MetricModels:
    root = metric_models.materialise_tiny(cache=cache)  # already there: returns the folder
    return metric_models.MetricModels(hub=root / "hub", clip=str(root / "clip"), dpt=str(root / "dpt"), fid_feature=64,
                                      tiny=True)


def test_identical_images_give_the_known_answers(suite):
    samples = _samples()
    real = np.stack([s.image for s in samples])
    same = suite.evaluate(real, samples)
    assert set(same) == set(METRICS)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-3)
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert abs(same["fid"]) < 1e-3  # numeric noise of the matrix square root only
    assert same["depth_mae_source"] == pytest.approx(0.0, abs=1e-6)
    assert same["region_fg_to_fg_ref"] == pytest.approx(1.0, abs=1e-5)  # gen ⊙ M == I ⊙ M
    assert 0 <= same["clip_score"] <= 100 and same["inception_score"] >= 1 - 1e-6

    noisy = np.clip(real.astype(int) + np.random.default_rng(2).integers(-60, 60, real.shape), 0, 255).astype(np.uint8)
    other = suite.evaluate(noisy, samples)
    assert other["ssim"] < 0.99 and other["lpips"] > 1e-4 and other["fid"] > same["fid"] + 1e-4
    assert other["depth_mae_source"] > 1e-4
    assert suite.evaluate(noisy, samples) == other  # deterministic


def test_missing_metric_networks_are_one_line_each(tmp_path):
    problems = metric_models.check(metric_models.resolve(str(tmp_path / "nothing")))
    assert len(problems) == 4
    assert all("\n" not in p and "--metrics-models" in p for p in problems)
    assert "weights-inception-2015-12-05" in problems[0] and "alexnet" in problems[1]
    assert "CLIP" in problems[2] and "depth" in problems[3]


def test_pickled_objects_are_refused_in_the_hub_folder(tmp_path, tiny_metrics_cache):
    import pickle
    import shutil

    root = metric_models.materialise_tiny(cache=tiny_metrics_cache)
    shutil.copytree(root, tmp_path / "mm")
    ckpt = tmp_path / "mm" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    ckpt.write_bytes(pickle.dumps(object()))
    problems = metric_models.check(metric_models.resolve(str(tmp_path / "mm")))
    assert len(problems) == 1 and "not a plain tensor state dict" in problems[0]


def test_repeated_keys_are_evaluated_once():
    from cnc_model.evaluation.run import unique_keys

    a, b = _samples(2)
    again = TripletSample(**{**a.__dict__, "image": b.image})
    assert [s.key for s in unique_keys([a, b, again])] == ["s0", "s1"]
    assert unique_keys([a, b, again])[0] is a


def test_seed_lists():
    from cnc_model.evaluation.cli import _parse_seeds

    assert _parse_seeds("0") == [0] and _parse_seeds("0,1,2") == [0, 1, 2] and _parse_seeds("2-4,0") == [2, 3, 4, 0]


def test_per_network_tiny_options_match_metrics_models_tiny(tmp_path, tiny_metrics_cache, monkeypatch):
    """``--clip-model tiny`` / ``--depth-model tiny`` give the very networks of ``--metrics-models tiny``; the other
    networks keep their own source (here a folder without them: exactly those are reported missing)."""
    monkeypatch.setenv("CNC_CACHE_DIR", str(tiny_metrics_cache))
    full = metric_models.resolve("tiny")
    mixed = metric_models.resolve(str(tmp_path / "nothing"), "tiny", "tiny")
    assert (mixed.clip, mixed.dpt) == (full.clip, full.dpt) and mixed.hub == tmp_path / "nothing" / "hub"
    assert (full.kind(), mixed.kind(), metric_models.resolve(str(tmp_path)).kind()) == ("tiny", "mixed", "real")
    assert mixed.describe()["clip"] == "tiny" and mixed.describe()["inception_alexnet"] == str(mixed.hub)
    problems = metric_models.check(mixed)
    assert len(problems) == 2 and "Inception" in problems[0] and "AlexNet" in problems[1]
    own = metric_models.resolve("tiny", clip=str(tmp_path / "my-clip"))  # an explicit override wins over tiny
    assert own.clip == str(tmp_path / "my-clip") and own.dpt == full.dpt and own.kind() == "mixed"


def test_model_labels_and_process_counts():
    from cnc.base.errors import UserError
    from cnc_model.evaluation.cli import _labels, _num_processes

    assert _labels(["out/a", "out/b"], ["ema", "ema"]) == ["a", "b"]
    assert _labels(["out/c", "out/c"], ["ema", "raw"]) == ["c-ema", "c-raw"]  # one checkpoint, both weights
    assert _labels(["x/c", "y/c"], ["ema", "ema"]) == ["c-A", "c-B"]
    assert _num_processes("auto", "cpu") == 1 and _num_processes("3", "cpu") == 3  # CPU processes: gloo
    for bad in ("0", "two"):
        with pytest.raises(UserError, match=f"--num-processes takes a positive integer or auto, got '{bad}'") as err:
            _num_processes(bad, "cpu")
        assert err.value.exit_code == 2

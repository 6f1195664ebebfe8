"""``cnc sample`` end to end on a tiny pipeline: conditions from a build config (``-c build/tiny``), overrides, the
missing-model line, the ``conditions/`` record, ``--shard-sample``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnc import tiny
from cnc_model.testing.tiny import tiny_cnc_pipeline


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_cnc_pipeline().save_pretrained(root / "ckpt")
    model, processor = tiny.tiny_dpt(0)
    model.save_pretrained(root / "dpt")
    processor.save_pretrained(root / "dpt")
    rng = np.random.default_rng(0)
    for name, size in (("fg.png", (70, 50)), ("bg.png", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    return root


def _args(root, *extra):
    return ["sample", str(root / "ckpt"), "--prompt", "a lower tower", "--fg", str(root / "fg.png"), "--bg",
            str(root / "bg.png"), "--steps", "2", "--height", "64", "--width", "96", "--seed", "1", *extra]


def _sheet_geometry(rows: int, size=(96, 64)):
    """Where ``cnc sample`` draws the tiles of a sheet of the ``assets`` pipeline (folder ``ckpt``)."""
    from cnc_model.sample_cli import SHEET_COLUMNS
    from triplets.inspect.grid import grid_geometry

    return grid_geometry([*SHEET_COLUMNS, "generated: ckpt (pipeline)"], rows, size, footer="settings")


def _has_text(img, box) -> bool:
    return (np.asarray(img.crop(box).convert("L")) < 128).sum() > 5


def test_cnc_sample_end_to_end(assets, tmp_path):
    import json

    from cnc.cli import app
    from triplets.image_io import decode_png

    out = tmp_path / "out"
    result = CliRunner().invoke(app, _args(assets, "--output", str(out), "-c", "build/tiny", "--depth-model",
                                           str(assets / "dpt"), "--num-images", "2", "--fg-scale", "0.5"))
    assert result.exit_code == 0, result.output
    assert "--num-images is deprecated; use --n" in result.output
    samples = sorted(out.glob("sample_*.png"))
    assert len(samples) == 2 and Image.open(samples[0]).size == (96, 64)
    sheet, g = Image.open(out / "sheet.png"), _sheet_geometry(2)
    assert sheet.size == g.size  # 2 rows (seeds 1, 2) x [fg, bg, fg depth, bg depth, mask | the image]
    for r, path in enumerate(samples):  # row r shows image r at full size, under the column titles, with a caption
        assert np.array_equal(np.asarray(sheet.crop(g.tile_box(r, 5))), np.asarray(Image.open(path).convert("RGB")))
        assert _has_text(sheet, g.caption_box(r))
    assert all(_has_text(sheet, g.header_box(c)) for c in range(6))
    # image i has seed --seed + i: the second image alone, from --seed 2, is the same picture
    again = CliRunner().invoke(app, _args(assets, "--output", str(tmp_path / "again"), "-c", "build/tiny",
                                          "--depth-model", str(assets / "dpt"), "--n", "1", "--fg-scale", "0.5",
                                          "--seed", "2"))
    assert again.exit_code == 0, again.output
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in (*samples, tmp_path / "again" / "sample_0.png")]
    assert np.abs(pixels[2] - pixels[1]).max() <= 1  # equal up to the rounding of a batch of 2 vs 1 on CPU
    assert np.abs(pixels[0] - pixels[1]).mean() > 10  # another seed, another picture
    cond = out / "conditions"
    assert decode_png((cond / "fg_depth.png").read_bytes()).shape == (64, 96)
    assert decode_png((cond / "bg_depth.png").read_bytes()).dtype == np.uint16
    assert set(np.unique(decode_png((cond / "mask.png").read_bytes()))) <= {0, 255}
    record = json.loads((cond / "conditions.json").read_text())
    # the pipeline folder records no training conditions: the explicit build config, the shortcut as an override
    assert record["origin"].startswith("explicit (build/tiny) + --set depth.model=") and record["trained"] is None
    assert record["settings"]["depth"]["model"] == str(assets / "dpt") and record["size"] == [64, 96]
    assert "depth.model" in record["models"] and record["attention"]["fp32_logits"] is False


def test_cnc_sample_missing_depth_model_fails_fast(assets, tmp_path):
    from cnc.cli import app

    missing = tmp_path / "no-such-dpt"
    result = CliRunner().invoke(app, _args(assets, "--output", str(tmp_path / "o"), "-c", "build/tiny",
                                           "--depth-model", str(missing)))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "--depth-model" in lines[0] and "depth.model" in lines[0]
    assert not (tmp_path / "o").exists()
    dataset = CliRunner().invoke(app, _args(assets, "--output", str(tmp_path / "d"), "-c", "build/tiny", "--set",
                                            "segment.backend=dataset"))
    assert dataset.exit_code == 2 and "--fg-mask" in dataset.output, dataset.output


def test_cnc_sample_checks_every_model_before_loading_any(assets, tmp_path, monkeypatch):
    """Offline, every missing model is one line (hub ids are looked up in the cache only, no retries)."""
    from cnc.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, _args(assets, "--output", str(tmp_path / "o"), "-c", "build/tiny",
                                           "--depth-model", "nobody/no-such-dpt", "--sam-checkpoint",
                                           str(tmp_path / "no.pth")))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 2, result.output
    depth, sam = sorted(lines, key=lambda line: "no.pth" in line)  # one line per model, whatever the order
    assert "nobody/no-such-dpt" in depth and "--depth-model" in depth
    assert "no.pth" in sam and "--sam-checkpoint" in sam
    assert not (tmp_path / "o").exists()


def test_cnc_sample_with_the_builders_sam_segmenter(assets, tmp_path):
    from cnc.cli import app

    out = tmp_path / "sam"
    result = CliRunner().invoke(app, _args(assets, "--output", str(out), "-c", "build/tiny", "--sam-checkpoint",
                                           "tiny", "--dtype", "bfloat16", "--attention-fp32-logits"))
    assert result.exit_code == 0, result.output
    mask_tile = np.asarray(Image.open(out / "sheet.png").convert("L").crop(_sheet_geometry(1).tile_box(0, 4)))
    assert set(np.unique(mask_tile)) <= {0, 255} and 0 < mask_tile.mean() < 255
    import json

    record = json.loads((out / "conditions" / "conditions.json").read_text())
    assert record["attention"] == {"resize_mode": "reference", "fp32_logits": True, "dtype": "bfloat16"}


def test_cnc_sample_from_a_built_shard_sample(assets, tmp_path):
    from cnc.cli import app
    from cnc.config import load_config
    from triplets.builder import TripletBuilder
    from triplets.config import BuildConfig
    from triplets.readers import read_items
    from triplets.shardio import write_shard

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(assets / "fg.png").save(photos / "obj.png")
    (photos / "obj.txt").write_text("a lower tower")
    cfg = load_config(BuildConfig, "configs/build/tiny.yaml",
                      ["resolution=64", "min_side=32", "inpaint.num_inference_steps=2", "segment.min_area=0.0"])
    samples, failures = TripletBuilder(cfg)(read_items(str(photos)))
    assert not failures
    write_shard(tmp_path / "000000.tar", samples)
    out = tmp_path / "from-shard"
    args = ["sample", str(assets / "ckpt"), "--shard-sample", f"{tmp_path / '000000.tar'}#obj", "--steps", "2",
            "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Image.open(out / "sample_0.png").size == (64, 64)
    from cnc_model.sample_cli import SHEET_COLUMNS
    from triplets.inspect.grid import grid_geometry

    g = grid_geometry(["I (shard sample)", "I_b (shard sample)", *SHEET_COLUMNS[2:], "generated: ckpt (pipeline)"],
                      1, 64, footer="settings")
    mask_tile = np.asarray(Image.open(out / "sheet.png").convert("L").crop(g.tile_box(0, 4)))
    assert np.array_equal(mask_tile > 127, samples[0].mask.astype(bool))
    from triplets.sample import encode_sample

    shard = encode_sample(samples[0])
    for member in ("mask.png", "fg_depth.png", "bg_depth.png"):  # conditions/ holds the triplet's own maps
        assert (out / "conditions" / member).read_bytes() == shard[member], member
    bad = CliRunner().invoke(app, args[:3] + [f"{tmp_path / '000000.tar'}#nope"] + args[4:])
    assert bad.exit_code == 2 and "no sample with key 'nope'" in bad.output

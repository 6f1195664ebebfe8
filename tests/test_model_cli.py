"""``cnc sample`` end to end on a tiny pipeline and a tiny DPT depth model saved to tmp_path."""

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


def test_cnc_sample_end_to_end(assets, tmp_path):
    from cnc.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, _args(assets, "--out", str(out), "--depth-model", str(assets / "dpt"),
                                           "--num-images", "2", "--fg-scale", "0.5"))
    assert result.exit_code == 0, result.output
    samples = sorted(out.glob("sample_*.png"))
    assert len(samples) == 2 and Image.open(samples[0]).size == (96, 64)
    sheet = Image.open(out / "sheet.png")
    assert sheet.size == (96 * (5 + 2), 64)  # fg, bg, fg depth, bg depth, mask | 2 outputs


def test_cnc_sample_missing_depth_model_fails_fast(assets, tmp_path):
    from cnc.cli import app

    missing = tmp_path / "no-such-dpt"
    result = CliRunner().invoke(app, _args(assets, "--out", str(tmp_path / "o"), "--depth-model", str(missing)))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "--depth-model" in lines[0]
    assert not (tmp_path / "o").exists()

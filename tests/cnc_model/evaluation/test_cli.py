"""``cnc eval`` checks what it can before generating (issue 26.4): each broken input is one ``error:`` line and exit
2, in a fresh process, and nothing is written: too few triplets for FID, a pipeline component missing (named with its
folder), an unreadable cnc_export.json, a truncated safetensors file, impossible numbers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support import REPO


@pytest.fixture(scope="module")
def broken(tiny_shards, tiny_metrics_cache, tmp_path_factory) -> dict:
    """A good tiny pipeline, copies missing vae/ and tokenizer/, one with a broken cnc_export.json, one with a
    truncated UNet, a one-triplet shard."""
    from cnc_model.data import first_samples
    from cnc_model.testing.tiny import tiny_cnc_pipeline
    from triplets.shardio.tario import write_shard

    root = tmp_path_factory.mktemp("eval-inputs")
    good = root / "pipe"
    tiny_cnc_pipeline().save_pretrained(good)
    for name, part in (("no_vae", "vae"), ("no_tokenizer", "tokenizer")):
        shutil.copytree(good, root / name)
        shutil.rmtree(root / name / part)
    shutil.copytree(good, root / "bad_export")
    (root / "bad_export" / "cnc_export.json").write_text('{"weights": ')
    shutil.copytree(good, root / "cut_unet")
    weights = root / "cut_unet" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one = root / "one" / "000000.tar"
    one.parent.mkdir()
    write_shard(one, first_samples([str(sorted(tiny_shards.glob("*.tar"))[0])], 1))
    env = {**os.environ, "CNC_CACHE_DIR": str(tiny_metrics_cache), "HF_HUB_OFFLINE": "1"}
    return {"root": root, "good": good, "shards": tiny_shards, "one": one, "env": env}


CASES = {  # pipeline, shards, extra args -> text of the one error line
    "one_triplet": ("good", "one", [], "--shards: 1 well-formed triplet(s) found; FID needs at least 2"),
    "no_vae": ("no_vae", "shards", [], "component vae (AutoencoderKL) is missing: no folder {root}/no_vae/vae"),
    "no_tokenizer": ("no_tokenizer", "shards", [],
                     "component tokenizer (CLIPTokenizer) is missing: no folder {root}/no_tokenizer/tokenizer"),
    "bad_export": ("bad_export", "shards", [], "{root}/bad_export/cnc_export.json is unreadable (cnc_export.json "),
    "cut_unet": ("cut_unet", "shards", [], "{root}/cut_unet/unet/diffusion_pytorch_model.safetensors is unreadable"),
    "n_0": ("good", "shards", ["--n", "0"], "--n 0: FID needs at least 2 triplets"),
    "inf_guidance": ("good", "shards", ["--guidance", "inf"], "--guidance inf: must be a number in 0 .. 100"),
}


def test_broken_inputs_are_one_line_before_any_generation(broken, tmp_path):
    procs = {}
    for name, (pipe, shards, extra, _) in CASES.items():  # all at once: most of each is a single-threaded start-up
        args = ["eval", str(broken["root"] / pipe if pipe != "good" else broken["good"]), "--shards",
                str(broken[shards]), "--output", str(tmp_path / name), "--metrics-models", "tiny", "--device", "cpu",
                "--steps", "1", *extra]
        procs[name] = subprocess.Popen([sys.executable, "-m", "cnc.cli", *args], cwd=REPO, env=broken["env"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        expected = CASES[name][3].format(root=broken["root"])
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, f"{name}: {err[-3000:]}"
        assert len(errors) == 1 and expected in errors[0], f"{name}: {err[-3000:]}"
        assert "Traceback" not in out + err, name
        assert not (tmp_path / name).exists(), name  # refused before generating anything

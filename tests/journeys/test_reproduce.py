"""The paper's recipe (docs/reproduce.md) end to end through the CLI in fresh processes, with tiny models.

The commands are the documented ones, run in a working folder laid out as the docs assume (``data/``,
``checkpoints/``, ``out/reference/``), with only the overrides that make them tiny (models -> ``tiny``, 64 px, half
an epoch): the shipped ``build/reference-{coco,pickapic}`` and ``train/reference-{local,global,joint}`` configs
carry every other setting, paths included.

1. ``cnc convert-reference checkpoints/uni.ckpt -o checkpoints/uni --base-model SD --save-unet`` (a synthetic uni.ckpt
   whose frozen UNet is not the base's: the comparison says so, and the stages train against its own UNet);
   at the same time the two builds (COCO-Stuff with dataset masks, Pick-a-Pic with U²-Net; reference depth);
2. the three training stages, by epochs, with no ``--set`` beyond the tiny ones (local and global at once);
3. ``cnc sample`` of the joint run: its conditions default to the training shards' settings (U²-Net from the
   Pick-a-Pic build, reference depth) and are bit-identical to the build's for the same photo; asking for the
   processor depth is reported and recorded. (``cnc eval``'s check of the evaluation shards' build settings runs in
   tests/journeys/test_train_sample_eval.py, on the same code.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.support import REPO

TINY_BUILD = ["--set", "inpaint.model=tiny", "--set", "depth.model=tiny", "--set", "embed.model=tiny", "--set",
              "segment.u2net_checkpoint=tiny", "--set", "resolution=64", "--set", "inpaint.num_inference_steps=1",
              "--set", "ray.num_workers=1", "--set", "ray.progress_interval_s=1", "--no-progress"]
TINY_TRAIN = ["--set", "model.pretrained_model_name_or_path=tiny", "--set", "data.resolution=64", "--set",
              "data.num_workers=0", "--set", "data.shuffle_buffer=4", "--set", "train.train_batch_size=2", "--set",
              "train.num_train_epochs=0.5", "--set", "train.gradient_checkpointing=false", "--set",
              "validation.num_samples=0", "--set", "train.report_to=none", "--set", "train.progress_bar=false"]


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _photo(seed: int, h: int = 72, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    img[h // 4:3 * h // 4, w // 4:3 * w // 4] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def _datasets(root) -> bytes:
    """Two COCO-Stuff images (captions JSON, stuff-thing label maps) and a Pick-a-Pic parquet with two kept rows (one
    prompt with an embedded line break); returns the bytes of the first kept Pick-a-Pic image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    coco = root / "data" / "coco"
    for sub in ("annotations", "train2017", "stuffthingmaps_trainval2017/train2017"):
        (coco / sub).mkdir(parents=True)
    images, annotations = [], []
    for i, image_id in enumerate((9, 25)):
        name = f"{image_id:012d}"
        (coco / "train2017" / f"{name}.jpg").write_bytes(_jpeg(_photo(i)))
        labels = np.full((72, 96), 120, np.uint8)  # stuff everywhere ...
        labels[18:54, 24:72] = 17  # ... and one thing (class 17)
        Image.fromarray(labels).save(coco / "stuffthingmaps_trainval2017" / "train2017" / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg"})
        annotations.append({"id": 100 + i, "image_id": image_id, "caption": f"a small object number {i}"})
    (coco / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": images,
                                                                               "annotations": annotations}))
    pick = root / "data" / "pickapic_v1" / "data"
    pick.mkdir(parents=True)
    jpgs = [_jpeg(_photo(10 + i, 80, 80)) for i in range(4)]
    pq.write_table(pa.table({
        "caption": ["a red fox sitting\nin the snow", "a blue bird on a wire"], "label_0": [1.0, 0.0],
        "label_1": [0.0, 1.0], "image_0_uid": ["fox0", "bird0"], "image_1_uid": ["fox1", "bird1"],
        "jpg_0": [jpgs[0], jpgs[1]], "jpg_1": [jpgs[2], jpgs[3]]}), pick / "train-00000.parquet")
    return jpgs[0]  # fox0: image 0 preferred


def _uni_ckpt(path, base_unet) -> None:
    """Uni-ControlNet's layout: a local adapter (its 21-channel pre_extractor) and its own frozen UNet, here the base
    UNet moved slightly in every tensor (as an EMA copy differs from the non-EMA one)."""
    import torch

    from cnc_model.convert import local_key_to_reference, unet_state_dict_to_reference
    from cnc_model.testing.tiny import randomize_zero_convs, tiny_local_fuser

    lf = tiny_local_fuser(base_unet, seed=4)
    randomize_zero_convs(lf, seed=4)
    state = {local_key_to_reference(k, 2): v for k, v in lf.state_dict().items()
             if not k.startswith(("depth_extractor.fg_extractor.", "depth_extractor.bg_extractor."))}
    state["local_adapter.feature_extractor.pre_extractor.0.weight"] = torch.zeros(32, 21, 3, 3)
    g = torch.Generator().manual_seed(3)
    own = {k: v + 1e-3 * (v.abs().mean() + 1e-3) * torch.randn(v.shape, generator=g)
           for k, v in base_unet.state_dict().items()}
    state.update(unet_state_dict_to_reference(own, 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)


def _run_all(*calls, cwd, env) -> list[subprocess.CompletedProcess]:
    """``cnc`` commands at once (fresh processes), each checked."""
    procs = [subprocess.Popen([sys.executable, "-m", "cnc.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=cwd) for args in calls]
    done = []
    for args, proc in zip(calls, procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"cnc {' '.join(args)} failed:\n{out}\n{err[-4000:]}"
        done.append(subprocess.CompletedProcess(proc.args, 0, out, err))
    return done


@pytest.mark.ray
def test_the_reference_recipe_end_to_end(tmp_path, ray_local):
    from diffusers import UNet2DConditionModel

    from cnc.hub import resolve_pretrained
    from triplets.shardio import iter_raw_samples

    work = tmp_path / "work"
    fox = _datasets(work)
    sd = resolve_pretrained("tiny", "model.pretrained_model_name_or_path")  # the tiny base every stage loads
    _uni_ckpt(work / "checkpoints" / "uni.ckpt", UNet2DConditionModel.from_pretrained(sd, subfolder="unet"))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)

    # 1. the frozen UNet uni.ckpt holds (reported against the base), and the two builds (on the session's local Ray:
    #    two more Ray starts would double this test's cost)
    ray_address = ["--address", ray_local.get_runtime_context().gcs_address]
    convert, *_ = _run_all(
        ["convert-reference", "checkpoints/uni.ckpt", "-o", "checkpoints/uni", "--base-model", sd, "--save-unet"],
        ["build", "-c", "build/reference-coco", "--input", "data/coco/annotations/captions_train2017.json",
         "--output", "out/reference/coco", *TINY_BUILD, *ray_address],
        ["build", "-c", "build/reference-pickapic", "--input", "data/pickapic_v1/data/", "--output",
         "out/reference/pickapic", *TINY_BUILD, *ray_address], cwd=work, env=env)
    assert "probably the EMA/non-EMA copy" in convert.stdout and (work / "checkpoints/uni/unet/config.json").is_file()
    pick = {r["__key__"]: r for t in sorted((work / "out/reference/pickapic").glob("*.tar"))
            for r in iter_raw_samples(str(t))}
    assert sorted(pick) == ["bird1", "fox0"] and pick["fox0"]["txt"].decode() == "a red fox sitting"  # cut at \n
    coco = [r for t in sorted((work / "out/reference/coco").glob("*.tar")) for r in iter_raw_samples(str(t))]
    assert len(coco) == 2 and json.loads(coco[0]["json"])["mask_source"] == "dataset"

    # 2. the three stages, by epochs (4 samples, batch 2: 2 batches per epoch, half an epoch = 1 step)
    _run_all(["train", "-c", "train/reference-local", *TINY_TRAIN], ["train", "-c", "train/reference-global",
                                                                      *TINY_TRAIN], cwd=work, env=env)
    _run_all(["train", "-c", "train/reference-joint", *TINY_TRAIN], cwd=work, env=env)
    import yaml

    joint = yaml.safe_load((work / "out/reference/joint/train_config.yaml").read_text())
    assert joint["train"]["max_train_steps"] == 1 and joint["model"]["unet"] == "checkpoints/uni/unet"
    assert joint["provenance"]["models"]["model.unet"]["identity"].startswith("sha256:")
    assert joint["provenance"]["conditions"]["sampling"]["segment"]["backend"] == "u2net"

    # 3. sample with the training conditions (default) and with another depth preprocessing; evaluate
    (work / "fox.jpg").write_bytes(fox)
    sample = ["sample", "out/reference/joint", "--prompt", "a fox", "--fg", "fox.jpg", "--bg", "fox.jpg", "--steps",
              "1"]
    default, other = _run_all([*sample, "-o", "samples/default"],
                              [*sample, "-o", "samples/processor", "--set", "depth.preprocess=processor"],
                              cwd=work, env=env)
    assert "conditions: as the model's training shards" in default.stderr, default.stderr[-3000:]
    record = json.loads((work / "samples/default/conditions/conditions.json").read_text())
    assert record["origin"] == "training shards" and record["differences"] == []
    assert record["settings"]["segment"]["backend"] == "u2net" and record["settings"]["depth"]["preprocess"] == \
        "reference" and record["unet"]["id"] == "checkpoints/uni/unet"
    for member in ("mask.png", "fg_depth.png"):  # the same photo: bit-identical to the Pick-a-Pic build's maps
        assert (work / "samples/default/conditions" / member).read_bytes() == pick["fox0"][member], member
    assert "conditions DIFFER from the model's training shards: depth.preprocess: reference -> processor" in \
        other.stderr, other.stderr[-3000:]
    changed = json.loads((work / "samples/processor/conditions/conditions.json").read_text())
    assert changed["differences"] == ["depth.preprocess: reference -> processor"]
    assert changed["settings"]["depth"]["preprocess"] == "processor"

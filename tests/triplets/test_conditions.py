"""One condition path (issue 30, item 1): the same photo through the build and through ``cnc sample --fg P --bg P``
with the build's settings gives bit-identical mask and depth maps, for the ``sam``, ``u2net`` and ``dataset``
backends and both depth preprocessings.

``cnc sample`` runs in-process (``CliRunner``) with ``-c BUILD_CONFIG``. The build side is the session's real ``cnc
build`` (``reference_build``: Ray workers, ``sam`` + ``processor``; sampled with one torch thread as its workers use --
the DPT processor's resize rounds differently with another thread count, by at most one uint16 step) and, for the
other combinations, the builder those workers run (:class:`~triplets.builder.TripletBuilder`, in this process).
The recipe journey (tests/journeys/test_reproduce.py) checks ``cnc build`` -> ``cnc sample`` in fresh processes for
the reference's ``u2net`` + ``reference`` settings. Tiny models, 64 px.

What "bit-exact" rests on: the sampler calls the same stages on one (fg, bg) pair, i.e. the same model calls as a
build with ``batch_size: 1``. A build with larger batches gives the same values whenever the models' per-image results
do not depend on the batch (true for these maps on this CPU; in general a float rounding can move a depth value by
one uint16 step, 1.5e-5 of its range).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnc.config import load_config
from tests.support import FAST_BUILD, TINY_CONFIG
from triplets.conditions import ConditionSettings, build_settings, choose_conditions, sampling_settings
from triplets.config import BuildConfig
from triplets.image_io import decode_png

#: ``wide`` is cropped (the geometry matters); ``full`` gets an all-ones dataset mask, so the build's D_f of it is
#: depth(photo) -- what cnc sample's D_b of the same photo must be.
PHOTOS = {"wide": (80, 120), "full": (96, 96)}


def _photos(root):
    rng = np.random.default_rng(7)
    (root / "masks").mkdir(parents=True)
    for i, (name, (h, w)) in enumerate(PHOTOS.items()):
        img = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
        img[h // 4:3 * h // 4, w // 5:3 * w // 5] = rng.integers(0, 256, 3, dtype=np.uint8)
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"object number {i}")
        mask = np.full((h, w), 255 if name == "full" else 0, np.uint8)
        mask[h // 4:3 * h // 4, w // 5:3 * w // 5] = 255
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from cnc_model.testing.tiny import tiny_cnc_pipeline

    root = tmp_path_factory.mktemp("conditions")
    tiny_cnc_pipeline().save_pretrained(root / "pipe")
    return root, _photos(root / "photos")


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sample(pipe, photo, config, out, *extra) -> dict:
    """``cnc sample`` of ``photo`` as fg and bg with the build config ``config``; ``{member: bytes}`` of
    ``out/conditions`` and the record."""
    from typer.testing import CliRunner

    from cnc.cli import app

    run = CliRunner().invoke(app, ["sample", str(pipe), "--prompt", "p", "--fg", str(photo), "--bg", str(photo),
                                   "-c", str(config), "--steps", "1", "--output", str(out), *extra])
    assert run.exit_code == 0, run.output
    cond = out / "conditions"
    files = {p.name: p.read_bytes() for p in cond.iterdir()}
    return {**files, "record": json.loads(files["conditions.json"])}


def _same_maps(sampled: dict, shard: dict, where) -> None:
    for member in ("mask.png", "fg_depth.png"):  # the shard's own encoder: equal bytes = equal maps
        assert sampled[member] == shard[member], (where, member)
    assert decode_png(sampled["bg_depth.png"]).dtype == np.uint16


@pytest.mark.ray
def test_cnc_build_and_cnc_sample_make_identical_conditions(reference_build, assets, tmp_path):
    """The real build (Ray workers, one torch thread each) against cnc sample with its _cnc/config.yaml."""
    from triplets.shardio import iter_raw_samples

    out, _, src, photos = reference_build
    shard = {raw["__key__"]: raw for tar in sorted(out.glob("*.tar")) for raw in iter_raw_samples(str(tar))}
    with _threads(1):
        for key in photos["good"][:2]:
            sampled = _sample(assets[0] / "pipe", src / f"{key}.jpg", out / "_cnc" / "config.yaml", tmp_path / key)
            _same_maps(sampled, shard[key], key)
            assert sampled["record"]["settings"]["segment"]["backend"] == "sam"


@pytest.mark.parametrize("backend,preprocess", [("sam", "reference"), ("u2net", "processor"), ("u2net", "reference"),
                                                ("dataset", "processor"), ("dataset", "reference")])
def test_builder_and_cnc_sample_make_identical_conditions(assets, tmp_path, backend, preprocess):
    from cnc.config import save_config
    from triplets.builder import TripletBuilder
    from triplets.readers import read_items
    from triplets.sample import encode_sample

    root, photos = assets
    cfg = load_config(BuildConfig, TINY_CONFIG, FAST_BUILD + [
        f"segment.backend={backend}", f"depth.preprocess={preprocess}", "segment.min_area=0.0",
        "segment.max_area=1.0", "quality.enabled=false", "inpaint.num_inference_steps=1", "device=cpu"])
    samples, failures = TripletBuilder(cfg)(read_items(str(photos)))
    assert not failures
    config = save_config(cfg, tmp_path / "config.yaml").path
    for s in samples:
        if backend != "dataset" and s.key == "full":
            continue  # the all-ones mask only matters for the dataset backend
        mask = ["--fg-mask", str(photos / "masks" / f"{s.key}.png")] if backend == "dataset" else []
        sampled = _sample(root / "pipe", photos / f"{s.key}.png", config, tmp_path / s.key, *mask)
        shard = encode_sample(s)
        _same_maps(sampled, shard, s.key)
        record = sampled["record"]
        assert record["settings"]["depth"]["preprocess"] == preprocess and record["size"] == [64, 64]
        assert record["settings"]["segment"]["backend"] == backend and record["differences"] == []
        if s.key == "full":  # D_f of an all-ones mask = depth(photo) = D_b of the photo at sampling
            # the same image, but at another place of the DPT batch than in the build's call: equal up to one
            # uint16 step (measured: 1 with the processor, 0 with the reference preprocessing)
            bg, fg = (decode_png(b).astype(int) for b in (sampled["bg_depth.png"], shard["fg_depth.png"]))
            assert np.abs(bg - fg).max() <= 1


def test_settings_of_mixed_builds_and_explicit_choices(tmp_path):
    coco = load_config(BuildConfig, "build/reference-coco")
    pick = load_config(BuildConfig, "build/reference-pickapic")
    builds = {"coco": ConditionSettings.from_build(coco), "pickapic": ConditionSettings.from_build(pick),
              "old": None}
    chosen, notes = sampling_settings(builds)
    # the reference's recipe samples with U²-Net masks (COCO's dataset masks do not exist at sampling time)
    assert chosen.segment.backend == "u2net" and chosen.depth.preprocess == "reference"
    assert any("segment settings from pickapic" in n for n in notes) and any("old" in n for n in notes)
    choice = choose_conditions(chosen, overrides=["depth.preprocess=processor"])
    assert choice.differences == ["depth.preprocess: reference -> processor"]
    assert "DIFFER" in choice.line() and choice.record()["trained"]["depth"]["preprocess"] == "reference"
    same = choose_conditions(chosen)
    assert same.differences == [] and same.origin == "training shards" and "as the model's" in same.line()
    unknown = choose_conditions(None)
    assert unknown.origin == "default" and "not recorded" in unknown.line()
    # a u2net build's unused SAM keys are no difference; a used key is
    assert ConditionSettings.from_build(pick).differences(
        ConditionSettings.from_build(pick.model_copy(update={"segment": pick.segment.model_copy(
            update={"sam_checkpoint": "other.pth", "u2net_threshold": 0.4})}))) == [
        "segment.u2net_threshold: 0.5 -> 0.4"]
    # build folders record their settings (manifest config), also behind a glob
    (tmp_path / "b" / "_cnc").mkdir(parents=True)
    (tmp_path / "b" / "_cnc" / "manifest.json").write_text(json.dumps({"config": json.loads(pick.model_dump_json())}))
    assert build_settings(str(tmp_path / "b")) == builds["pickapic"]
    assert build_settings(str(tmp_path / "b" / "*.tar")) == builds["pickapic"]
    assert build_settings(str(tmp_path / "nowhere")) is None

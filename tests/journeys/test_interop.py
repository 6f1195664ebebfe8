"""Issues 13 and 28: every folder ``cnc`` writes is a dataset, and stays one.

One tiny real build (the session's ``tiny_shards``, copied) goes through every command that touches a build folder,
each in a fresh process: ``cnc inspect --html --card`` (reports under ``_cnc/``), ``cnc filter`` (a new folder) and
``cnc score`` of the filtered copy (a new folder; its config found in the filtered folder's ``_cnc/``). Each of the
three folders is then read by stock webdataset + ``triplets.wds.decoder()``, wids with the manifest, Ray Data over the
folder and Hugging Face ``datasets`` over the folder, and must give uint16 depth equal to ``decode_sample``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.support import REPO
from triplets.sample import decode_sample
from triplets.shardio import iter_raw_samples

ARRAYS = ("jpg", "mask.png", "bg.jpg", "fg_depth.png", "bg_depth.png", "fg_emb.npy", "bg_emb.npy")
ATTR = {"jpg": "image", "mask.png": "mask", "bg.jpg": "background", "fg_depth.png": "fg_depth",
        "bg_depth.png": "bg_depth", "fg_emb.npy": "fg_emb", "bg_emb.npy": "bg_emb"}
FOLDERS = ("build", "filtered", "scored")


def _cnc(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, f"cnc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def _reference(folder) -> dict:
    ref = {}
    for tar in sorted(folder.glob("*.tar")):
        for raw in iter_raw_samples(str(tar)):
            ref[raw["__key__"]] = decode_sample(raw)
    return ref


@pytest.fixture(scope="module")
def folders(tiny_shards, tmp_path_factory):
    """``{name: (folder, {key: decode_sample})}`` after each command that touches a folder: the build after
    ``cnc inspect --html --card``, its ``cnc filter`` copy, and the ``cnc score`` copy of that."""
    root = tmp_path_factory.mktemp("interop")
    build = root / "build"
    shutil.copytree(tiny_shards, build)
    _cnc("inspect", str(build), "-n", "2", "--html", "--card")
    assert (build / "_cnc" / "inspect" / "index.html").is_file()
    _cnc("filter", str(build), "--output", str(root / "filtered"), "--where", "mask_area>=0", "--keep-unscored")
    _cnc("score", str(root / "filtered"), "--output", str(root / "scored"))  # config: filtered/_cnc/config.yaml
    out = {name: (root / name, _reference(root / name)) for name in FOLDERS}
    assert set(out["filtered"][1]) == set(out["scored"][1]) == set(out["build"][1]) and len(out["build"][1]) == 6
    assert all("quality" in s.meta for s in out["scored"][1].values())
    return out


@pytest.fixture(params=FOLDERS)
def built(request, folders):
    return folders[request.param]


def _same(ref, key: str, field: str, value) -> None:
    want = getattr(ref, ATTR[field])
    got = np.asarray(value)
    assert got.dtype == want.dtype and got.shape == want.shape, (key, field, got.dtype, got.shape)
    np.testing.assert_array_equal(got, want, err_msg=f"{key} {field}")


def test_layout_only_tars_at_top(built):
    out, ref = built
    top = sorted(p.name for p in out.iterdir())
    visible = [n for n in top if not n.startswith((".", "_"))]
    assert visible and all(n.endswith(".tar") for n in visible), top
    meta = {p.name for p in (out / "_cnc").iterdir()}
    assert {"manifest.json", "README.md", "config.yaml", "000000_stats.json"} <= meta, meta
    assert (out / ".huggingface.yaml").is_file()
    card = (out / "_cnc" / "README.md").read_text()
    assert "license: unknown" in card and "fg_depth.png" in card and "depth.model" in card
    assert f"samples: {len(ref)} in 2 shard(s)" in card
    if out.name != "build":
        assert "derived from" in card and ("cnc filter" in card or "cnc score" in card), card


def test_stock_webdataset_with_decoder_and_collate(built):
    import torch
    import webdataset as wds
    from torch.utils.data import default_collate

    import triplets.wds

    out, ref = built
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    stock = np.asarray(next(iter(wds.WebDataset(urls, shardshuffle=False).decode("l8")))["fg_depth.png"])
    assert stock.dtype == np.uint8 and (stock == 255).mean() > 0.9  # what stock decoders do (documented bug)
    seen = 0
    for s in wds.WebDataset(urls, shardshuffle=False).decode(triplets.wds.decoder()):
        r = ref[s["__key__"]]
        for f in ARRAYS:
            _same(r, s["__key__"], f, s[f])
        assert s["txt"] == r.caption and s["json"] == r.meta
        seen += 1
    assert seen == len(ref)
    ds = wds.WebDataset(urls, shardshuffle=False).decode(triplets.wds.decoder(torch=True)).to_tuple(
        "jpg", "fg_depth.png", "mask.png", "fg_emb.npy", "txt")
    batch = default_collate([next(iter(ds)) for _ in range(1)] + list(ds)[1:3])
    assert batch[1].dtype == torch.uint16 and batch[1].shape == (3, 64, 64)
    assert batch[0].dtype == torch.uint8 and batch[3].dtype == torch.float32 and len(batch[4]) == 3


def test_wids_with_manifest(built, tmp_path):
    wids = pytest.importorskip("wids")
    import triplets.wds

    out, ref = built
    ds = wids.ShardListDataset(str(out / "_cnc" / "manifest.json"), base=str(out), transformations=[],
                               cache_dir=str(tmp_path / "wids"))
    assert len(ds) == len(ref)
    for i in range(len(ds)):
        s = triplets.wds.decode(ds[i])
        for f in ARRAYS:
            _same(ref[s["__key__"]], s["__key__"], f, s[f])


@pytest.mark.ray
def test_ray_data_over_the_folder(built, ray_local):
    import ray.data

    import triplets.wds

    out, ref = built
    rows = ray.data.read_webdataset(str(out)).take_all()  # the folder, no extra arguments
    assert sorted(r["__key__"] for r in rows) == sorted(ref)
    for r in rows:  # Ray's own decoder keeps 16 bits; masks stay 0/255
        want = ref[r["__key__"]]
        _same(want, r["__key__"], "fg_depth.png", r["fg_depth.png"])
        np.testing.assert_array_equal(np.asarray(r["mask.png"]) > 127, want.mask == 1)
    rows = ray.data.read_webdataset(str(out), decoder=triplets.wds.decode).take_all()
    for r in rows:
        for f in ARRAYS:
            _same(ref[r["__key__"]], r["__key__"], f, r[f])


def test_hf_datasets_over_the_folder(built, tmp_path):
    datasets = pytest.importorskip("datasets")
    import triplets.wds

    out, ref = built
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))  # no extra arguments
    assert len(ds) == len(ref)
    for row in ds:
        key = row["__key__"]
        _same(ref[key], key, "fg_depth.png", np.asarray(row["fg_depth.png"]))
        _same(ref[key], key, "bg_depth.png", np.asarray(row["bg_depth.png"]))
    raw = ds.cast_column("fg_depth.png", datasets.Image(decode=False))[0]
    assert triplets.wds.decode({"fg_depth.png": raw["fg_depth.png"]["bytes"]})["fg_depth.png"].dtype == np.uint16

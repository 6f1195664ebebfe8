"""The plan (:mod:`pipelines.plan`) of row-range inputs (tables, WebDataset tars): plan form and determinism, changed
inputs refused, lazy items, object storage, and ``cnc build --plan-only`` on 1M rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnc.config import load_config
from pipelines.plan import PlanMismatchError, plan_input, prepare_plan, shard_size
from tests.support import FAST_BUILD, REPO, TINY_CONFIG, make_photo_folder, table_rows
from triplets.config import BuildConfig
from triplets.readers import ReadOptions, detect_format, shard_items
from triplets.shardio import BuildOutput
from triplets.shardio.names import PLAN_FILE


def _cfg(*extra: str) -> BuildConfig:
    return load_config(BuildConfig, TINY_CONFIG, FAST_BUILD + ["max_failure_fraction=0.5", *extra])


def items_of(spec: dict, cfg: BuildConfig) -> list[dict]:
    return shard_items(spec, ReadOptions.from_config(cfg))


def test_table_plan_is_row_ranges_and_deterministic(photo_table):
    root, _ = photo_table
    assert detect_format(str(root)) == "table" and detect_format(str(root / "part-00000.parquet")) == "table"
    plan = plan_input(_cfg(), str(root), "table")
    assert plan_input(_cfg(), str(root), "table") == plan  # same inputs and config -> the same plan
    assert (plan["version"], plan["num_items"], len(plan["inputs"])) == (2, 11, 2)
    assert [shard_size(s) for s in plan["shards"]] == [3, 3, 3, 2]
    assert all("items" not in s for s in plan["shards"])
    assert [[(r["file"], r["start"], r["stop"]) for r in s["ranges"]] for s in plan["shards"]] == [
        [(0, 0, 3)], [(0, 3, 6)], [(1, 0, 3)], [(1, 3, 5)]]
    items = [it for s in plan["shards"] for it in items_of(s, _cfg())]
    assert [it["key"] for it in items] == sorted(it["key"] for it in items)  # plan order = file, row order
    assert items[0]["source"] == str(root.parent / "images" / f"{items[0]['key']}.jpg")
    assert items[0]["caption"] == f"a photo called {items[0]['key']}"
    assert plan_input(_cfg("samples_per_shard=4"), str(root), "table")["shards"][1]["ranges"] == [  # spans 2 files
        {"file": 0, "url": str(root / "part-00000.parquet"), "start": 4, "stop": 6},
        {"file": 1, "url": str(root / "part-00001.parquet"), "start": 0, "stop": 2}]


def test_changed_input_file_is_refused(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        pq.write_table(pa.table(table_rows([f"f{i}_{j}" for j in range(4)])), src / f"p{i}.parquet")
    out = BuildOutput(str(tmp_path / "out"))
    prepare_plan(out, plan_input(_cfg(), str(src), "table"))
    prepare_plan(out, plan_input(_cfg(), str(src), "table"))  # unchanged: resumes
    pq.write_table(pa.table(table_rows(["f1_0", "f1_1", "f1_x", "f1_3"])), src / "p1.parquet")  # same rows, new content
    os.utime(src / "p1.parquet", ns=(1, 1))
    with pytest.raises(PlanMismatchError, match=r"p1.parquet changed"):
        prepare_plan(out, plan_input(_cfg(), str(src), "table"))
    pq.write_table(pa.table(table_rows(["n"])), src / "p2.parquet")
    with pytest.raises(PlanMismatchError, match=r"p2.parquet added"):
        prepare_plan(out, plan_input(_cfg(), str(src), "table"))
    # content hashes: a byte-identical copy (new mtime) of an input is the same input
    (src / "p2.parquet").unlink()
    out2 = BuildOutput(str(tmp_path / "out2"))
    prepare_plan(out2, plan_input(_cfg("input_hash=true"), str(src), "table"))
    data = (src / "p0.parquet").read_bytes()
    (src / "p0.parquet").write_bytes(data)
    os.utime(src / "p0.parquet", ns=(2, 2))
    prepare_plan(out2, plan_input(_cfg("input_hash=true"), str(src), "table"))
    make_photo_folder(tmp_path / "photos", 1, bad=())
    with pytest.raises(PlanMismatchError, match=r"plan version 2 \(this is 1\)"):  # a table plan is no folder plan
        prepare_plan(out2, plan_input(_cfg(), str(tmp_path / "photos"), "folder"))


def test_plan_only_on_a_million_rows(tmp_path):
    n = 1_000_000
    src = tmp_path / "big"
    src.mkdir()
    for part in range(4):
        ids = pa.array(range(part * n // 4, (part + 1) * n // 4))
        urls = pa.compute.binary_join_element_wise("s3://bucket/img/", pa.compute.cast(ids, pa.string()), ".jpg", "")
        pq.write_table(pa.table({"url": urls, "caption": pa.compute.cast(ids, pa.string())}),
                       src / f"part-{part:05d}.parquet")
    cmd = [sys.executable, "-m", "cnc.cli", "build", "--config", str(TINY_CONFIG), "--input", str(src),
           "--output", str(tmp_path / "out"), "--plan-only"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert (info["items"], info["shards"], info["input_files"], info["version"]) == (n, 1000, 4, 2)
    plan = json.loads((tmp_path / "out" / "_cnc" / PLAN_FILE).read_text())
    assert info["plan_bytes"] == (tmp_path / "out" / "_cnc" / PLAN_FILE).stat().st_size < 400_000  # ~200 B per shard
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "_cnc"]  # no shard
    assert sorted(p.name for p in (tmp_path / "out" / "_cnc").iterdir()) == ["config.yaml", PLAN_FILE]
    assert plan["shards"][999]["ranges"] == [{"file": 3, "url": str(src / "part-00003.parquet"), "start": 249000,
                                              "stop": 250000}]
    # a changed input is refused in one line, exit 2
    pq.write_table(pa.table({"url": ["x.jpg"], "caption": ["x"]}), src / "part-00004.parquet")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "part-00004.parquet added" in proc.stderr and "Traceback" not in proc.stderr


def tar(path: Path, n: int) -> None:
    """An img2dataset-style tar of ``n`` photos (``000000000.jpg`` + ``.txt``...)."""
    import io
    import tarfile

    from PIL import Image

    from tests.support import synthetic_photo

    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(synthetic_photo(i, 88, 104)).save(buf, "JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"cap {path.stem} {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars_are_planned_by_member_range(tmp_path):
    from triplets.readers import read_items

    src = tmp_path / "wds"
    src.mkdir()
    tar(src / "00000.tar", 4)
    tar(src / "00001.tar", 3)
    plan = plan_input(_cfg(), str(src), "webdataset")
    assert (plan["version"], plan["num_items"], [f["rows"] for f in plan["inputs"]]) == (2, 7, [4, 3])
    assert [[(r["file"], r["start"], r["stop"]) for r in s["ranges"]] for s in plan["shards"]] == [
        [(0, 0, 3)], [(0, 3, 4), (1, 0, 2)], [(1, 2, 3)]]
    items = [it for s in plan["shards"] for it in items_of(s, _cfg())]
    assert items == read_items(str(src))  # the same items the version-1 reader lists, in the same order
    # an output holding a version-1 plan of the same tars resumes with a version-1 plan
    out = BuildOutput(str(tmp_path / "old"))
    prepare_plan(out, plan_input(_cfg(), str(src), "webdataset", version=1))
    from pipelines.build import _plan_version

    assert _plan_version(out) == 1 and "items" in plan_input(_cfg(), str(src), "webdataset", version=1)["shards"][0]
    tar(src / "00001.tar", 2)  # a changed tar is refused
    out2 = BuildOutput(str(tmp_path / "new"))
    prepare_plan(out2, plan)
    with pytest.raises(PlanMismatchError, match="00001.tar changed"):
        prepare_plan(out2, plan_input(_cfg(), str(src), "webdataset"))


def test_table_on_object_storage(s3_server, tmp_path):
    """Tables in an S3 bucket (moto on 127.0.0.1): planned from footers and etags; a rewritten object is refused."""
    import fsspec

    bucket = s3_server.bucket("tables")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for i in range(2):
        pq.write_table(pa.table(table_rows([f"m{i}{j}" for j in range(3)], "img/")), tmp_path / f"{i}.parquet")
        fs.put_file(str(tmp_path / f"{i}.parquet"), f"tables/t/part-{i}.parquet")
    src = f"{bucket}/t/*.parquet"
    assert detect_format(f"{bucket}/t") == "table" and detect_format(src) == "table"
    plan = plan_input(_cfg(), src, "table")
    assert plan["num_items"] == 6 and [f["url"] for f in plan["inputs"]] == [
        f"{bucket}/t/part-0.parquet", f"{bucket}/t/part-1.parquet"]
    assert all(f.get("etag") for f in plan["inputs"])
    items = items_of(plan["shards"][1], _cfg())
    assert [(it["key"], it["source"]) for it in items] == [(f"m1{j}", f"{bucket}/t/img/m1{j}.jpg") for j in range(3)]
    out = BuildOutput(str(tmp_path / "out"))
    prepare_plan(out, plan)
    pq.write_table(pa.table(table_rows(["m10", "m11", "m1x"], "img/")), tmp_path / "1.parquet")
    fs.put_file(str(tmp_path / "1.parquet"), "tables/t/part-1.parquet")
    with pytest.raises(PlanMismatchError, match="part-1.parquet changed"):
        prepare_plan(out, plan_input(_cfg(), src, "table"))

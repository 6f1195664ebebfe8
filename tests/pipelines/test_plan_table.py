"""Table inputs (parquet/CSV/JSONL) planned by row ranges: plan form and determinism, changed inputs refused, lazy
items, an end-to-end build on Ray with a worker killed mid-shard, and ``cnc build --plan-only`` on 1M rows."""

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
from pipelines.build import run_build
from pipelines.plan import PlanMismatchError, items_of, plan_input, prepare_plan, shard_size
from tests.support import FAST_BUILD, REPO, TINY_CONFIG, make_photo_folder, start_driver
from triplets.config import BuildConfig
from triplets.readers import InputError, detect_format
from triplets.readers_table import TableColumns, read_rows
from triplets.shardio import BuildOutput
from triplets.shardio.names import PLAN_FILE


def _cfg(*extra: str) -> BuildConfig:
    return load_config(BuildConfig, TINY_CONFIG, FAST_BUILD + ["max_failure_fraction=0.5", *extra])


def _rows(keys: list[str], folder: str = "") -> dict[str, list]:
    return {"url": [f"{folder}{k}.jpg" for k in keys], "caption": [f"a photo called {k}" for k in keys],
            "key": keys}


@pytest.fixture(scope="module")
def photo_table(tmp_path_factory) -> tuple[Path, dict]:
    """The 11-item photo folder (8 good, 3 bad) described by two parquet files of 6 and 5 rows in a folder of their
    own (the input); image paths absolute."""
    base = tmp_path_factory.mktemp("table")
    photos = make_photo_folder(base / "images", 8)
    keys = sorted(photos["good"] + photos["bad"])
    root = base / "tables"
    root.mkdir()
    pq.write_table(pa.table(_rows(keys[:6], f"{base}/images/")), root / "part-00000.parquet", row_group_size=4)
    pq.write_table(pa.table(_rows(keys[6:], f"{base}/images/")), root / "part-00001.parquet", row_group_size=4)
    return root, photos


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


def test_csv_and_jsonl_give_the_parquet_items(tmp_path):
    keys = [f"{i:09d}" for i in range(7)]  # img2dataset keys: zeros kept, also in CSV
    rows = _rows(keys) | {"caption": [f"a, \"quoted\"\nmultiline {k}" for k in keys]}
    pq.write_table(pa.table(rows), tmp_path / "t.parquet", row_group_size=3)
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.table(rows), tmp_path / "t.csv")
    with open(tmp_path / "t.jsonl", "w") as f:
        for i in range(7):
            f.write(json.dumps({c: rows[c][i] for c in rows}) + "\n")
    cols = TableColumns()
    ref = read_rows(str(tmp_path / "t.parquet"), 2, 6, cols)
    assert [it["key"] for it in ref] == keys[2:6]
    for name in ("t.csv", "t.jsonl"):
        assert [(it["key"], it["source"].rsplit("/", 1)[-1], it["caption"]) for it in
                read_rows(str(tmp_path / name), 2, 6, cols)] == [
            (it["key"], it["source"].rsplit("/", 1)[-1], it["caption"]) for it in ref]
        plan = plan_input(_cfg(), str(tmp_path / name), "table")
        assert plan["num_items"] == 7  # CSV: rows, not lines (the captions hold newlines)
    # no key column: keys derived from file stem and row; configurable column names
    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"img": ["a.jpg", None], "text": ["x", None]}), tmp_path / "other" / "o.parquet")
    items = items_of(plan_input(_cfg("table.image_column=img", "table.caption_column=text"),
                                str(tmp_path / "other"), "table")["shards"][0],
                     _cfg("table.image_column=img", "table.caption_column=text"))
    assert [(it["key"], it["caption"]) for it in items] == [("o/000000000", "x"), ("o/000000001", "")]
    assert items[1]["source"] == ""  # no image: fails per item when read
    with pytest.raises(InputError, match="missing columns"):
        plan_input(_cfg(), str(tmp_path / "other"), "table")


def test_changed_input_file_is_refused(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        pq.write_table(pa.table(_rows([f"f{i}_{j}" for j in range(4)])), src / f"p{i}.parquet")
    out = BuildOutput(str(tmp_path / "out"))
    prepare_plan(out, plan_input(_cfg(), str(src), "table"))
    prepare_plan(out, plan_input(_cfg(), str(src), "table"))  # unchanged: resumes
    pq.write_table(pa.table(_rows(["f1_0", "f1_1", "f1_x", "f1_3"])), src / "p1.parquet")  # same rows, new content
    os.utime(src / "p1.parquet", ns=(1, 1))
    with pytest.raises(PlanMismatchError, match=r"p1.parquet changed"):
        prepare_plan(out, plan_input(_cfg(), str(src), "table"))
    pq.write_table(pa.table(_rows(["n"])), src / "p2.parquet")
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


@pytest.mark.ray
def test_table_build_killed_driver_and_worker_is_exactly_once(ray_local, photo_table, tmp_path):
    """``cnc build`` on the table (joined to the session's Ray) is SIGKILLed after its first commit; the rerun loses
    a worker mid-shard; every item ends up committed exactly once."""
    import signal

    from test_build_ray import _assert_exactly_once

    root, photos = photo_table
    out = tmp_path / "out"
    env = dict(os.environ, CNC_TEST_FAULT_INJECTION=json.dumps({"batch_delay_s": 0.5}))
    cmd = [sys.executable, "-m", "cnc.cli", "build", "--config", str(TINY_CONFIG), "--input", str(root),
           "--output", str(out), "--no-progress", "--address", ray_local.get_runtime_context().gcs_address]
    cmd += [a for o in FAST_BUILD + ["max_failure_fraction=0.5", "ray.num_workers=1"] for a in ("--set", o)]
    proc = start_driver(cmd, tmp_path / "driver.log", lambda: bool(list(out.glob("_cnc/*_stats.json"))), cwd=REPO,
                        env=env, poll_s=0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert len(list(out.glob("_cnc/*_stats.json"))) < 4, "the build finished before the kill"
    fault = {"kill_shard": 3, "kill_after_batches": 1}  # the rerun's worker dies in shard 3's first attempt
    result = run_build(_cfg(), str(root), out, progress=False, fault_injection=fault)
    assert result.exit_code == 0 and result.shards_lost == [] and result.items_total == 11
    assert result.shards_skipped >= 1 and json.loads((out / "_cnc" / "000003_stats.json").read_text())["attempt"] >= 1
    _assert_exactly_once(out, photos)
    manifest = json.loads((out / "_cnc" / "manifest.json").read_text())
    assert manifest["input_format"] == "table" and manifest["totals"]["shards_committed"] == 4
    again = run_build(_cfg(), str(root), out, progress=False)
    assert (again.shards_built, again.shards_skipped) == (0, 4)  # resume: markers only, no work


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
        pq.write_table(pa.table(_rows([f"m{i}{j}" for j in range(3)], "img/")), tmp_path / f"{i}.parquet")
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
    pq.write_table(pa.table(_rows(["m10", "m11", "m1x"], "img/")), tmp_path / "1.parquet")
    fs.put_file(str(tmp_path / "1.parquet"), "tables/t/part-1.parquet")
    with pytest.raises(PlanMismatchError, match="part-1.parquet changed"):
        prepare_plan(out, plan_input(_cfg(), src, "table"))

"""Pick-a-Pic v1 parquet reader: the reference's rules on a small parquet written by the test."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from triplets.readers import InputError, detect_format, read_items, read_source_bytes
from triplets.readers.pickapic import load_stopwords, read_pickapic
from triplets.stages import LoadStage


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((72, 96, 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


ROWS = [  # caption, label_0, label_1, uid_0, uid_1
    ("a red fox: in the snow", 1.0, 0.0, "u-fox0", "u-fox1"),      # image 0 preferred; ':' removed
    ("a blue bird on a wire", 0.0, 1.0, "u-bird0", "u-bird1"),     # image 1 preferred
    ("a tie between both images", 0.5, 0.5, "u-tie0", "u-tie1"),   # tie -> image 1
    ("another prompt, same winner", 0.0, 1.0, "u-x", "u-bird1"),   # duplicate uid -> dropped
    ("two words", 1.0, 0.0, "u-short0", "u-short1"),               # < 3 words -> dropped
    ("a:b c", 1.0, 0.0, "u-colon0", "u-colon1"),                   # 'ab c' = 2 words after ':' removal
    ("a pretty Girl in the rain", 1.0, 0.0, "u-girl0", "u-girl1"),  # stop word (case-insensitive)
    ("a girl, in the rain", 1.0, 0.0, "u-comma0", "u-comma1"),     # 'girl,' is not the word 'girl': kept
]


def _write(path, rows, start=0, row_group_size=3):
    n = len(rows)
    table = pa.table({
        "caption": [r[0] for r in rows], "label_0": [r[1] for r in rows], "label_1": [r[2] for r in rows],
        "image_0_uid": [r[3] for r in rows], "image_1_uid": [r[4] for r in rows],
        "jpg_0": [_jpeg(10 * (start + i)) for i in range(n)], "jpg_1": [_jpeg(10 * (start + i) + 5) for i in range(n)],
        "ranking_id": list(range(n)),
    })
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture()
def parquet_dir(tmp_path):
    d = tmp_path / "pickapic"
    d.mkdir()
    _write(d / "train-00000.parquet", ROWS)
    _write(d / "train-00001.parquet", [("a fox again in snow", 0.0, 1.0, "u-fox1b", "u-fox0")], start=20)
    return d


def test_reference_rules(parquet_dir):
    items = read_items(str(parquet_dir), "pickapic")
    by_key = {it["key"]: it for it in items}
    assert sorted(by_key) == ["u-bird1", "u-comma0", "u-fox0", "u-tie1"]  # u-fox0 again in file 2: duplicate
    assert by_key["u-fox0"]["caption"] == "a red fox in the snow"
    assert by_key["u-comma0"]["caption"] == "a girl, in the rain"
    f0 = str(parquet_dir / "train-00000.parquet")
    assert by_key["u-fox0"]["source"] == f"{f0}#jpg_0/0"
    assert by_key["u-bird1"]["source"] == f"{f0}#jpg_1/1" and by_key["u-tie1"]["source"] == f"{f0}#jpg_1/2"
    assert by_key["u-comma0"]["source"] == f"{f0}#jpg_0/7"  # row 7: third row group (size 3)
    assert all(it["mask_path"] is None and it["mask_kind"] is None for it in items)
    assert detect_format(f0) == "pickapic"


def test_cells_are_the_image_bytes_and_load(parquet_dir):
    items = {it["key"]: it for it in read_items(str(parquet_dir), "pickapic")}
    assert read_source_bytes(items["u-comma0"]["source"]) == _jpeg(70)
    assert read_source_bytes(items["u-tie1"]["source"]) == _jpeg(25)
    rows = {k: [items[u][k] for u in ("u-fox0", "u-bird1")] for k in ("key", "source", "caption", "mask_path",
                                                                       "mask_kind")}
    cols, failures = LoadStage(resolution=32, min_side=16).process(rows)
    assert failures == {}
    assert abs(int(cols["image"][0].mean()) - 0) <= 2 and abs(int(cols["image"][1].mean()) - 15) <= 2
    _, fails = LoadStage(resolution=32, min_side=16).process(
        {k: [v[0]] for k, v in rows.items()} | {"source": [f"{parquet_dir}/train-00000.parquet#jpg_0/99"]})
    assert "cannot read source" in fails[0] and "out of range" in fails[0]


def test_stopword_files(parquet_dir, tmp_path):
    assert {"girl", "woman", "nsfw", "spread"} <= load_stopwords() and len(load_stopwords()) == 69
    custom = tmp_path / "mine.txt"
    custom.write_text("# no girls here\nrain\n")
    keys = {it["key"] for it in read_pickapic(str(parquet_dir), stopwords=custom)}
    assert "u-girl0" not in keys and "u-comma0" not in keys and "u-fox0" in keys
    (parquet_dir / "stopwords.txt").write_text("")  # sidecar: empty = no stop words
    keys = {it["key"] for it in read_items(str(parquet_dir), "pickapic")}
    assert {"u-girl0", "u-comma0"} <= keys and "u-short0" not in keys


def test_fsspec_url_and_bad_inputs(parquet_dir, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/pp/train-00000.parquet", (parquet_dir / "train-00000.parquet").read_bytes())
    items = read_items("memory://pp/", "pickapic")
    assert {it["key"] for it in items} == {"u-bird1", "u-comma0", "u-fox0", "u-tie1"}
    src = next(it["source"] for it in items if it["key"] == "u-bird1")
    assert src.startswith("memory://") and read_source_bytes(src) == _jpeg(15)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="junk.parquet is not a readable parquet"):
        read_items(str(tmp_path / "junk.parquet"))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match="missing columns"):
        read_items(str(tmp_path / "other.parquet"))
    with pytest.raises(InputError, match="does not exist"):
        read_items(str(tmp_path / "nope"), "pickapic")

"""``table`` inputs (:mod:`triplets.readers.table`): parquet, CSV and JSONL give the same items; configurable
columns; derived keys."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnc.config import load_config
from pipelines.plan import plan_input
from tests.support import FAST_BUILD, TINY_CONFIG, table_rows
from triplets.config import BuildConfig
from triplets.readers import InputError, ReadOptions, TableColumns, shard_items
from triplets.readers.table import read_rows


def _cfg(*extra: str) -> BuildConfig:
    return load_config(BuildConfig, TINY_CONFIG, FAST_BUILD + ["max_failure_fraction=0.5", *extra])


def items_of(spec: dict, cfg: BuildConfig) -> list[dict]:
    return shard_items(spec, ReadOptions.from_config(cfg))


def test_csv_and_jsonl_give_the_parquet_items(tmp_path):
    keys = [f"{i:09d}" for i in range(7)]  # img2dataset keys: zeros kept, also in CSV
    rows = table_rows(keys) | {"caption": [f"a, \"quoted\"\nmultiline {k}" for k in keys]}
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

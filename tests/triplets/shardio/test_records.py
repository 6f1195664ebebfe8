"""The typed build records (:mod:`triplets.shardio.records`): markers, error rows and the manifest header round-trip
through their one writer and one reader; foreign markers read leniently; failures counted once."""

from __future__ import annotations

import json

import pytest

from cnc.base.location import resolve
from triplets.shardio.records import (
    ErrorRecord,
    FailureTotals,
    ManifestHeader,
    ShardMarker,
    ShardStats,
    count_failures,
    load_marker,
    read_errors,
    read_manifest,
    write_errors,
    write_manifest,
    write_marker,
)


def test_marker_round_trip_keeps_exactly_the_fields_set(tmp_path):
    stats = ShardStats(shard=3, name="000003", fingerprint="f" * 16, nitems=5, nsamples=4, nfailed=1, attempt=0,
                       failures_by_stage={"decode": 1}, failures_by_reason={"bad": 1}, seconds=1.5,
                       stage_seconds={"decode": 0.25}, worker={"pid": 7}, models={"depth.model": {"identity": "x"}})
    marker = ShardMarker.committed(stats, "000003.tar", 1024, "a" * 64, "_cnc/errors/000003.jsonl")
    loc = resolve(tmp_path / "000003_stats.json")
    write_marker(loc, marker)
    on_disk = json.loads(loc.read_bytes())
    assert sorted(on_disk) == sorted(["shard", "name", "fingerprint", "nitems", "nsamples", "nfailed", "attempt",
                                      "failures_by_stage", "failures_by_reason", "seconds", "stage_seconds",
                                      "worker", "models", "url", "bytes", "sha256", "errors"])  # no nulls written
    assert load_marker(loc) == marker
    assert load_marker(resolve(tmp_path / "missing_stats.json")) is None


def test_foreign_and_damaged_markers_read_leniently(tmp_path):
    """img2dataset's stats (``count``, ``duration``), wrong types read as None, and a non-object is an error."""
    m = ShardMarker.from_json({"count": 7, "successes": 7, "duration": 2, "failures": {"x": 1}})
    assert (m.nsamples, m.seconds, m.failures_by_reason, m.fingerprint) == (7, 2.0, {"x": 1}, None)
    m = ShardMarker.from_json({"nsamples": "many", "count": 3, "bytes": True, "sha256": 5, "stages": {"a": 1.0}})
    assert (m.nsamples, m.bytes, m.sha256, m.stage_seconds) == (3, None, None, {"a": 1.0})
    loc = resolve(tmp_path / "x_stats.json")
    loc.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_marker(loc)
    loc.write_text("{not json")
    with pytest.raises(ValueError):
        load_marker(loc)


def test_error_rows_round_trip_and_bad_lines_are_named(tmp_path):
    loc = resolve(tmp_path / "000000.jsonl")
    rows = [ErrorRecord("a", "decode", "truncated image file", "/in/a.jpg"), {"key": "b", "stage": "filter",
                                                                              "reason": "unreadable json: x"}]
    write_errors(loc, rows)
    assert [json.loads(line) for line in loc.read_text().splitlines()] == [
        {"key": "a", "source": "/in/a.jpg", "stage": "decode", "reason": "truncated image file"},
        {"key": "b", "stage": "filter", "reason": "unreadable json: x"}]  # no "source": null for derived rows
    loc.write_text(loc.read_text() + "not json\n\n[1]\n")
    records, bad = read_errors(loc)
    assert [r.key for r in records] == ["a", "b"] and records[0].source == "/in/a.jpg" and bad == [3, 5]
    write_errors(loc, [])
    assert loc.read_bytes() == b"" and read_errors(loc) == ([], [])


def test_failures_are_counted_per_shard_with_a_cap_and_added_once():
    fails = [{"stage": "decode", "reason": f"r{i}"} for i in range(150)]
    by_stage, by_reason = count_failures(fails)
    assert by_stage == {"decode": 150}
    assert len(by_reason) == 101 and sum(by_reason.values()) == 150 and by_reason["<other>"] == 50
    a = ShardMarker(nfailed=2, failures_by_stage={"decode": 2}, failures_by_reason={"x": 2})
    b = ShardMarker(nfailed=1, failures_by_stage={"segment": 1}, failures_by_reason={"x": 1})
    totals = FailureTotals.of([a, b, ShardMarker()])
    assert (totals.failed, dict(totals.by_stage), dict(totals.by_reason)) == (3, {"decode": 2, "segment": 1},
                                                                              {"x": 3})


def test_manifest_header_is_a_wids_index_of_the_markers(tmp_path):
    markers = [ShardMarker(url=f"00000{i}.tar", nsamples=3 - i, bytes=100 + i, sha256=str(i)) for i in range(2)]
    header = ManifestHeader.of_markers("out", markers)
    loc = resolve(tmp_path / "manifest.json")
    written = write_manifest(loc, header, {"totals": {"samples": 5}})
    assert written == {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "out", "totals": {"samples": 5},
                       "shardlist": [{"url": "000000.tar", "nsamples": 3, "filesize": 100, "sha256": "0"},
                                     {"url": "000001.tar", "nsamples": 2, "filesize": 101, "sha256": "1"}]}
    again, whole = read_manifest(loc)
    assert again == header and whole == written
    with pytest.raises(FileNotFoundError):
        read_manifest(resolve(tmp_path / "none.json"))

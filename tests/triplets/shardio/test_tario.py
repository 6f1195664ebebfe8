"""Tar bytes in and out (:mod:`triplets.shardio.tario`): the reproducible writer, and TarStream, the one streaming
reader (samples, keys only, digest, oddities to ``on_problem``, truncation as ShardReadError)."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from tests.support import make_sample, tar_bytes
from triplets.shardio import ShardReadError, TarStream, encode_tar, tar_keys, write_shard


def test_the_writer_is_reproducible_and_the_stream_reads_back_samples_keys_and_digest(tmp_path):
    samples = [make_sample(f"d/k{i}", i, size=16) for i in range(3)]
    assert encode_tar(samples) == encode_tar(samples)
    info = write_shard(tmp_path / "a.tar", samples)
    data = (tmp_path / "a.tar").read_bytes()
    assert info == {"nsamples": 3, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    stream = TarStream(str(tmp_path / "a.tar"))
    raws = list(stream.samples())
    assert [r["__key__"] for r in raws] == ["d/k0", "d/k1", "d/k2"] and "fg_depth.png" in raws[0]
    assert (stream.sha256, stream.nbytes) == (info["sha256"], info["bytes"])
    keys = TarStream(str(tmp_path / "a.tar"))
    assert list(keys.keys()) == ["d/k0", "d/k1", "d/k2"] == tar_keys(str(tmp_path / "a.tar"))
    assert keys.sha256 == info["sha256"]  # the keys-only pass checks and hashes the same bytes


def test_oddities_go_to_on_problem_and_damage_raises(tmp_path):
    problems: list[str] = []
    data = tar_bytes([("a.jpg", b"1"), ("a.txt", b"x"), ("a.TXT", b"y"), ("noext", b"z"), ("b.jpg", b"2")])
    (tmp_path / "odd.tar").write_bytes(data)
    raws = list(TarStream(str(tmp_path / "odd.tar"), on_problem=problems.append).samples())
    assert [r["__key__"] for r in raws] == ["a", "b"] and raws[0]["txt"] == b"y"  # suffixes lower-cased
    assert any("repeats suffix 'txt'" in p for p in problems) and any("no extension" in p for p in problems)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    (tmp_path / "cut.tar").write_bytes(data[:end])  # cut on a block boundary: only the end-of-archive marker is gone
    with pytest.raises(ShardReadError, match="truncated tar"):
        list(TarStream(str(tmp_path / "cut.tar")).keys())
    big = TarStream(str(tmp_path / "odd.tar"), on_problem=problems.append, max_member_bytes=0)
    assert list(big.samples()) == [] and any("over the limit" in p for p in problems)

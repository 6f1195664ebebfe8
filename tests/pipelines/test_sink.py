"""The shard sink (:mod:`pipelines.sink`): a streamed shard is byte-identical to ``encode_tar`` of the same samples,
and its marker's sha256 (computed while streaming) is the published tar's."""

from __future__ import annotations

from tests.support import make_sample
from triplets.sample import encode_sample
from triplets.shardio import BuildOutput, ShardStats, encode_tar, file_sha256, open_tar_writer, tar_keys


def _sample(key: str, seed: int = 0):
    return make_sample(key, seed, size=16, caption=f"caption {key}")


def test_streamed_tar_is_byte_identical_to_encode_tar(tmp_path):
    samples = [_sample(f"k{i}", i) for i in range(3)]
    path = tmp_path / "a.tar"
    with open(path, "wb") as f:
        tw = open_tar_writer(f)
        for s in samples:
            tw.write(encode_sample(s))
        tw.close()
    assert path.read_bytes() == encode_tar(samples)
    assert tar_keys(str(path)) == ["k0", "k1", "k2"]

    # the shard sink streams the same bytes and hashes them while writing: the marker's sha256 is the tar's
    from pipelines.sink import ShardSink

    with ShardSink(BuildOutput(str(tmp_path / "out")), 0) as sink:
        for s in samples:
            sink.write(encode_sample(s))
        marker = sink.commit([], ShardStats(shard=0, name="000000", nsamples=3))
    published = tmp_path / "out" / "000000.tar"
    assert published.read_bytes() == encode_tar(samples)
    assert marker.sha256 == file_sha256(published) and marker.bytes == published.stat().st_size

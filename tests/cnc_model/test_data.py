"""The streaming training loader (cnc_model.data) on real shards from a tiny build (6 samples, 2 marked shards)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from cnc_model import data
from triplets.shardio import iter_samples, resolve_shards, write_shard


def _keys(loader, n: int) -> list[str]:
    """Sample keys of the next ``n`` batches, flattened."""
    it = iter(loader)
    return [key for _ in range(n) for key in next(it)["keys"]]


def test_batch_decodes_the_sample_format_exactly(tiny_shards):
    loader = data.make_dataloader(str(tiny_shards), batch_size=2, shuffle_buffer=0,
                                  dropout=data.ConditionDropout(0, 0, 0, 0, 0))
    batch = next(iter(loader))
    by_key = {s.key: s for s in iter_samples(str(tiny_shards / "{000000..000001}.tar"))}
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["mask"].shape == (2, 1, 64, 64)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    for i, key in enumerate(batch["keys"]):
        s = by_key[key]
        fg = batch["fg_depth"][i]
        assert fg.shape == (3, 64, 64) and torch.equal(fg[0], fg[1]) and torch.equal(fg[0], fg[2])
        # 16-bit precision kept: exactly u16 / 65535, not an 8-bit re-quantisation
        assert torch.allclose(fg[0], torch.from_numpy(s.fg_depth.astype(np.float32) / 65535), atol=0)
        assert len(np.unique(s.fg_depth)) > 256 or not np.all(s.fg_depth % 257 == 0)
        assert torch.equal(batch["mask"][i, 0], torch.from_numpy(s.mask.astype(np.float32)))
        assert torch.equal(batch["fg_emb"][i], torch.from_numpy(s.fg_emb))
        assert torch.allclose(batch["pixel_values"][i], torch.from_numpy(s.image).permute(2, 0, 1) / 127.5 - 1)
        assert batch["captions"][i] == s.caption


def test_shard_specs_folder_glob_braces_and_remote(tiny_shards, tmp_path, caplog):
    tars = [str(tiny_shards / "000000.tar"), str(tiny_shards / "000001.tar")]
    assert resolve_shards(str(tiny_shards), committed_only=True) == tars
    assert resolve_shards(str(tiny_shards / "*.tar"), committed_only=True) == tars
    assert resolve_shards(str(tiny_shards / "{000000..000001}.tar"), committed_only=True) == tars
    # a folder uses only finished shards (with a _stats.json marker)
    folder = tmp_path / "build"
    shutil.copytree(tiny_shards, folder, ignore=shutil.ignore_patterns("_photos"))
    (folder / "_cnc" / "000001_stats.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert resolve_shards(str(folder), committed_only=True) == [str(folder / "000000.tar")]
    assert "no _stats.json marker" in caplog.text
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_shards(str(tmp_path / "nope/*.tar"), committed_only=True)
    # remote URLs through fsspec (the in-memory filesystem stands in for s3://)
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("000000.tar", "_cnc/000000_stats.json"):
        fs.pipe(f"/bucket/run/{name}", (tiny_shards / name).read_bytes())
    urls = resolve_shards("memory://bucket/run/", committed_only=True)
    assert len(urls) == 1 and urls[0].startswith("memory://") and urls[0].endswith("bucket/run/000000.tar")
    assert data.count_marked_samples(urls) == 3
    keys = _keys(data.make_dataloader(urls, batch_size=1, shuffle_buffer=0), 3)
    assert sorted(keys) == sorted(s.key for s in iter_samples(str(tiny_shards / "000000.tar")))


def test_condition_dropout_follows_the_stage(tiny_shards):
    assert data.ConditionDropout.for_stage("local") == data.ConditionDropout(0.1, 0.1, 0.1, 0.0, 0.0)
    assert data.ConditionDropout.for_stage("global") == data.ConditionDropout(0.1, 0.0, 0.0, 0.1, 0.1)
    assert data.ConditionDropout.for_stage("joint") == data.ConditionDropout(0.1, 0.1, 0.1, 0.1, 0.1)
    everything = data.ConditionDropout(1, 1, 1, 1, 1)
    batch = next(iter(data.make_dataloader(str(tiny_shards), batch_size=3, dropout=everything)))
    assert batch["captions"] == [""] * 3
    for name in ("fg_depth", "bg_depth", "fg_emb", "bg_emb"):
        assert not batch[name].any()
    assert batch["mask"].any()  # the mask is never dropped
    # p = 0.5 drops about half, independently per field
    rng = np.random.default_rng(0)
    item = {n: torch.ones(2) for n in ("fg_depth", "bg_depth", "fg_emb", "bg_emb")}
    drops = np.array([[not data.apply_condition_dropout(dict(item, caption="x"), data.ConditionDropout(
        *(0.5,) * 5), rng)[n].any() for n in item] for _ in range(400)])
    assert np.all(np.abs(drops.mean(0) - 0.5) < 0.1)
    assert abs(np.corrcoef(drops[:, 0], drops[:, 1])[0, 1]) < 0.2


@pytest.mark.parametrize("num_workers, world", [(0, 2), (2, 1), (2, 2)])
def test_ranks_and_workers_see_disjoint_samples(tiny_shards, num_workers, world):
    streams = world * max(1, num_workers)
    epoch = 6 if 6 % streams == 0 else streams  # one epoch must not wrap around any worker's share
    seen = []
    for rank in range(world):
        loader = data.make_dataloader(str(tiny_shards), batch_size=1, num_workers=num_workers, rank=rank,
                                      world_size=world, shuffle_buffer=2, epoch_samples=epoch)
        seen.append(_keys(loader, loader.batches_per_epoch))
    flat = seen[0] + (seen[1] if len(seen) > 1 else [])
    assert len(flat) == epoch and len(set(flat)) == epoch  # no sample delivered twice across ranks and workers


def test_resume_continues_the_exact_stream_with_workers(tiny_shards):
    def loader():
        return data.make_dataloader(str(tiny_shards), batch_size=1, num_workers=2, seed=3, shuffle_buffer=4,
                                    dropout=data.ConditionDropout(0.5, 0, 0, 0, 0))

    straight = loader()
    it = iter(straight)
    reference = [(b["keys"], b["captions"]) for b in (next(it) for _ in range(9))]  # crosses an epoch (6 batches)
    first = loader()
    it = iter(first)
    head = [(b["keys"], b["captions"]) for b in (next(it) for _ in range(3))]
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as in a checkpoint
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [(b["keys"], b["captions"]) for b in (next(it) for _ in range(6))]
    assert head + tail == reference


def test_truncated_shard_is_skipped_with_a_warning_and_counted(tiny_shards, tmp_path, caplog):
    shutil.copy(tiny_shards / "000001.tar", tmp_path / "000001.tar")
    whole = (tiny_shards / "000000.tar").read_bytes()
    (tmp_path / "000000.tar").write_bytes(whole[: len(whole) * 6 // 10 + 1])
    loader = data.make_dataloader(str(tmp_path / "*.tar"), batch_size=1, shuffle_buffer=0, epoch_samples=6)
    with caplog.at_level(logging.WARNING, logger="cnc_model.data"):
        keys = _keys(loader, 8)
    assert loader.skipped["shard"] >= 1
    assert "corrupt shard" in caplog.text and "000000.tar" in caplog.text
    intact = {s.key for s in iter_samples(str(tiny_shards / "000001.tar"))}
    assert intact <= set(keys)
    # the pre-flight check warns about it (the loader copes) unless strict
    urls = resolve_shards(str(tmp_path / "*.tar"), committed_only=True)
    assert any("truncated" in line for line in data.preflight_check(urls))
    with pytest.raises(ValueError, match="truncated"):
        data.preflight_check(urls, strict=True)


def test_preflight_rejects_malformed_samples(tiny_shards, tmp_path):
    samples = list(iter_samples(str(tiny_shards / "000000.tar")))
    write_shard(tmp_path / "000000.tar", samples[:1])
    import webdataset as wds

    from triplets.sample import encode_sample

    raw = encode_sample(samples[0])
    raw["__key__"] = "broken"
    raw["fg_depth.png"] = raw["jpg"]  # 8-bit RGB where uint16 depth belongs: a format error, not a damaged file
    with wds.TarWriter(str(tmp_path / "000001.tar")) as writer:
        writer.write(raw)
    with pytest.raises(ValueError, match="broken"):
        data.preflight_check(resolve_shards(str(tmp_path / "*.tar"), committed_only=True))


def test_compact_batches_convert_to_the_float_batch_exactly():
    """The trainer's loader ships uint8 pixels / uint16 depths (≈ 5× fewer bytes between processes) and converts on
    the device: the result equals the float32 batch bit for bit; a sample that needs resizing makes the batch float."""
    R = 64  # resolution of these samples
    from cnc_model.data import apply_condition_dropout, collate, is_compact, sample_to_tensors, to_device_batch
    from triplets.sample import TripletSample

    rng = np.random.default_rng(3)

    def sample(i: int, size: int) -> TripletSample:
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4:, : size // 2] = 1
        return TripletSample(
            key=f"k{i}", image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mask=mask,
            background=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            fg_depth=rng.integers(0, 65536, (size, size), dtype=np.uint16),
            bg_depth=rng.integers(0, 65536, (size, size), dtype=np.uint16),
            fg_emb=rng.normal(size=8).astype(np.float32), bg_emb=rng.normal(size=8).astype(np.float32),
            caption=f"c{i}", meta={})

    samples = [sample(i, R) for i in range(3)]
    want = collate([sample_to_tensors(s, R, 3) for s in samples])
    compact = collate([sample_to_tensors(s, R, 3, compact=True) for s in samples])
    assert is_compact(compact) and compact["fg_depth"].dtype == torch.uint16 and compact["fg_depth"].shape[1] == 1
    sent = sum(compact[k].nbytes for k in ("pixel_values", "fg_depth", "bg_depth", "mask"))
    assert sent * 4.5 < sum(want[k].nbytes for k in ("pixel_values", "fg_depth", "bg_depth", "mask"))
    got = to_device_batch(compact, "cpu", 3)
    for k in ("pixel_values", "fg_depth", "bg_depth", "mask", "fg_emb", "bg_emb"):
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    assert got["captions"] == want["captions"] and torch.equal(to_device_batch(want, "cpu")["fg_depth"], want["fg_depth"])

    # condition dropout zeroes compact entries to what the float path gives
    dropped = apply_condition_dropout(sample_to_tensors(samples[0], R, 1, compact=True),
                                      type("D", (), {"caption": 1, "fg_depth": 1, "bg_depth": 0, "fg_emb": 0,
                                                     "bg_emb": 0})(), np.random.default_rng(0))
    assert to_device_batch(collate([dropped]), None, 1)["fg_depth"].abs().sum() == 0

    # a sample stored at another size is resized in the worker: the mixed batch is float, compact ones converted
    mixed = collate([sample_to_tensors(samples[0], R, 3, compact=True),
                     sample_to_tensors(sample(9, 2 * R), R, 3, compact=True)], depth_channels=3)
    assert not is_compact(mixed) and mixed["fg_depth"].shape == (2, 3, R, R)
    assert torch.equal(mixed["pixel_values"][0], want["pixel_values"][0])

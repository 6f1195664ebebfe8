"""Tiny but real training shards for tests and the CPU demo: synthetic photos -> tiny ``TripletBuilder`` -> tars.

``build_tiny_shards(folder)`` writes ``000000.tar``, ``000001.tar`` ... with ``_cnc/NNNNNN_stats.json`` markers, a
``_cnc/manifest.json`` (wids index) and the dataset card, like a finished ``cnc build`` output, in ~20 s on 2 CPU cores
(tiny random models, 64 px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_photos(folder: str | Path, n: int, seed: int = 0) -> Path:
    """``n`` 96x80 PNGs (a coloured rectangle on a coloured background) with ``.txt`` captions."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.zeros((80, 96, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
        y, x = rng.integers(5, 30), rng.integers(5, 40)
        img[y:y + 40, x:x + 40] = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a lower tower number {i}")
    return folder


def build_tiny_shards(out_dir: str | Path, n_images: int = 6, n_shards: int = 2, resolution: int = 64,
                      seed: int = 0) -> list[Path]:
    """Build ``n_images`` triplets with the tiny build config and split them over ``n_shards`` marked tars."""
    from cnc.config import config_dict, config_hash, load_config
    from triplets.builder import TripletBuilder
    from triplets.card import write_card
    from triplets.config import BuildConfig
    from triplets.readers import read_items
    from triplets.shardio import BuildOutput, ManifestHeader, ShardStats, encode_tar, write_manifest
    from triplets.shardio.names import MANIFEST_FILE, shard_name

    out = Path(out_dir)
    photos = synthetic_photos(out / "_photos", n_images, seed)
    cfg = load_config(BuildConfig, None, [  # = configs/build/tiny.yaml at a small size
        "segment.sam_checkpoint=tiny", "segment.saliency_model=tiny", "inpaint.model=tiny", "depth.model=tiny",
        "embed.model=tiny", "batch_size=4", f"resolution={resolution}", f"min_side={min(32, resolution)}",
        "inpaint.num_inference_steps=2",
        "segment.min_area=0.0", "segment.max_area=1.0", f"seed={seed}"])
    samples, failures = TripletBuilder(cfg)(read_items(str(photos)))
    if failures or len(samples) != n_images:
        raise RuntimeError(f"tiny build failed: {failures}")
    output, fingerprint, markers = BuildOutput(str(out)), config_hash(cfg), []
    for i, chunk in enumerate(np.array_split(np.arange(len(samples)), n_shards)):
        staged = output.staging_path(i)  # committed like a build's shard: tar -> errors -> marker
        staged.write_bytes(encode_tar([samples[j] for j in chunk]))
        stats = ShardStats(shard=i, name=shard_name(i), fingerprint=fingerprint, nitems=len(chunk),
                           nsamples=len(chunk), nfailed=0)
        markers.append(output.commit_shard(i, staged, [], stats))
    manifest = write_manifest(output.file(MANIFEST_FILE), ManifestHeader.of_markers(out.name, markers), {
        "input": str(photos), "input_format": "folder", "models": samples[0].meta.get("models", {}),
        "config": config_dict(cfg),
        "totals": {"items": n_images, "samples": len(samples), "shards_planned": n_shards,
                   "shards_committed": n_shards, "failures": 0, "bytes": sum(m.bytes for m in markers)},
    })
    write_card(output, manifest)
    return [output.tar(i).local_path() for i in range(len(markers))]

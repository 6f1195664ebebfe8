"""Training loader: float32 batches vs compact batches (uint8 pixels, uint16 depths converted on the device).

    .venv/bin/python benchmarks/loader_transfer.py                      # 512², 64 samples, batch 8, 2 workers
    .venv/bin/python benchmarks/loader_transfer.py --resolution 256 --workers 0

Writes synthetic 512² shards (no models: seeded photos, gradient depths, a square mask), then reads them with
:func:`cnc_model.data.make_dataloader` exactly as ``cnc train`` does (decode, dropout, collate in the worker
processes), once with ``compact=False`` (float32 tensors cross the process boundary) and once with ``compact=True``,
and converts every batch with :func:`cnc_model.data.to_device_batch` on the device (CUDA when present, with pinned
memory). Prints bytes per sample that cross processes, batches/s and the ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def write_shards(folder: Path, n: int, resolution: int, per_shard: int = 16) -> list[str]:
    from build_throughput import synthetic_triplets

    from triplets.shardio import write_shard
    from triplets.shardio.names import tar_name

    samples = synthetic_triplets(n, resolution)
    urls = []
    for shard in range(-(-n // per_shard)):
        url = str(folder / tar_name(shard))
        write_shard(url, samples[shard * per_shard:(shard + 1) * per_shard])
        urls.append(url)
    return urls


def measure(urls: list[str], compact: bool, args: argparse.Namespace) -> dict:
    import torch

    from cnc_model.data import make_dataloader, to_device_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = make_dataloader(urls, batch_size=args.batch, num_workers=args.workers, shuffle_buffer=0,
                             epoch_samples=args.samples, resolution=args.resolution, compact=compact,
                             pin_memory=device.type == "cuda")
    it = iter(loader)
    first = next(it)  # worker start-up excluded
    sent = sum(v.nbytes for v in first.values() if isinstance(v, torch.Tensor)) / len(first["keys"])
    n, t0 = 0, time.perf_counter()
    for _ in range(args.batches):
        batch = to_device_batch(next(it), device, 3, non_blocking=True)
        batch["pixel_values"].sum().item()  # the batch is really there
        n += 1
    seconds = time.perf_counter() - t0
    return {"compact": compact, "bytes_per_sample": int(sent), "batches_per_s": n / seconds,
            "samples_per_s": n * args.batch / seconds, "device": str(device)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=24, help="timed batches per setting")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cnc-loader-") as tmp:
        urls = write_shards(Path(tmp), args.samples, args.resolution)
        rows = [measure(urls, False, args), measure(urls, True, args)]
    base = rows[0]
    print(f"loader at {args.resolution}², batch {args.batch}, {args.workers} workers, device {base['device']}")
    print("| batches | bytes/sample between processes | batches/s | vs float32 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {'compact (uint8/uint16)' if r['compact'] else 'float32'} | {r['bytes_per_sample'] / 1e6:.2f} MB | "
              f"{r['batches_per_s']:.2f} | {r['batches_per_s'] / base['batches_per_s']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

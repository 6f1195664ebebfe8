"""Cost of the ``quality`` stage next to the other stages (per-stage ms per sample), with tiny or local models.

    .venv/bin/python benchmarks/quality_cost.py --images 16 --resolution 128          # tiny models, CPU
    .venv/bin/python benchmarks/quality_cost.py --config configs/build/default.yaml --device cuda --images 64

Runs ``TripletBuilder.run_models`` (the worker's model loop) over synthetic photos after one warm-up batch and
prints seconds per stage as the build's markers record them (``stage_seconds``), plus the share of ``quality``.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/build/tiny.yaml")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="inpainting steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from cnc.config import load_config
    from cnc_model.training.tiny_data import synthetic_photos
    from triplets.builder import TripletBuilder
    from triplets.config import BuildConfig
    from triplets.readers import read_items

    torch.set_num_threads(1)
    cfg = load_config(BuildConfig, args.config, [
        f"resolution={args.resolution}", f"min_side={min(64, args.resolution)}", f"batch_size={args.batch_size}",
        f"inpaint.num_inference_steps={args.steps}", f"device={args.device}", "segment.min_area=0.0",
        "segment.max_area=1.0"])
    with tempfile.TemporaryDirectory() as tmp:
        items = read_items(str(synthetic_photos(tmp, args.images)))
        builder = TripletBuilder(cfg)
        builder.run_models(builder.decode(items[: args.batch_size]))  # warm-up
        seconds: collections.Counter = collections.Counter()
        t0 = time.perf_counter()
        for i in range(0, len(items), args.batch_size):
            builder.run_models(builder.decode(items[i:i + args.batch_size]), seconds)
        wall = time.perf_counter() - t0
    total = sum(seconds.values())
    print(f"{args.images} images at {args.resolution} px, batch {args.batch_size}, {args.steps} inpainting steps, "
          f"{args.config} on {args.device}, torch threads 1")
    print("| stage | ms/sample | share of model time |\n|---|---|---|")
    for stage, s in seconds.items():
        print(f"| {stage} | {1000 * s / args.images:.1f} | {s / total:.0%} |")
    print(f"model loop wall {wall:.1f} s; quality = {seconds['quality'] / total:.1%} of model time")


if __name__ == "__main__":
    main()

"""What the ``quality`` scores add to a build, per triplet: on the model thread (where the GPU waits) and off it.

    .venv/bin/python benchmarks/quality_cost.py --images 16 --resolution 128          # tiny models, CPU
    .venv/bin/python benchmarks/quality_cost.py --config configs/build/default.yaml --device cuda --images 64

One run measures, on the same synthetic photos and the same model instances, after one warm-up batch:

* **model loop** (``TripletBuilder.run_models``, the worker's model thread) with quality scores off and on: the
  difference is what scoring adds to the model thread now (version 2: CLIP on two crops cut on the device; D(I)
  reused from the segment stage, D(I_b) the stored map). With ``quality.clip_sim: false`` it adds nothing.
* **version 1's model-thread work**, re-enacted with the build's own model instances on the same batches (the
  baseline): the saliency model on I and I_b (for ``sam`` a second DPT pass on I and a first on I_b), CLIP on the
  two crops of the dilated box cut with PIL, and the per-image NumPy statistics — all of it on the model thread.
* **statistics** of version 2 (:func:`triplets.quality.statistics`), which now run in the worker's encode threads
  beside JPEG encoding: their CPU seconds per triplet, one thread.

Prints seconds per triplet and the ratio version 1 / version 2 on the model thread, plus the per-stage table the
markers record (``stage_seconds``).
"""

from __future__ import annotations

import argparse
import collections
import statistics as stats
import tempfile
import time

import numpy as np


def v1_model_thread_work(builder, batch: dict) -> None:
    """Quality version 1's per-batch work (``triplets/quality.py`` before version 2), with the builder's models:
    saliency on I and I_b, two PIL crops of the dilated box per sample through CLIP, and its NumPy statistics."""
    from PIL import Image

    from triplets.quality import mask_shape
    from triplets.stages.inpaint import dilate_mask

    segment, depth, embed = builder.model_stages[0], builder.model_stages[2], builder.model_stages[3]
    saliency = getattr(segment.segmenter, "prior_depth", None) or depth.estimator
    image, mask, background = batch["image"], batch["mask"], batch["background"]
    n, r = len(image), image.shape[1]
    sal = saliency(np.concatenate([image, background], axis=0))
    dilated = [dilate_mask(m, builder.cfg.inpaint.dilation_px, r) for m in mask]
    crops = []
    for src in (image, background):
        for i in range(n):
            ys, xs = np.nonzero(dilated[i])
            y0, y1, x0, x1 = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) if len(ys) else (0, r, 0, r)
            crops.append(np.asarray(Image.fromarray(np.ascontiguousarray(src[i, y0:y1, x0:x1])).resize(
                (224, 224), Image.BICUBIC)))
    emb = embed.embedder(np.stack(crops))
    for i in range(n):
        m = mask[i] > 0
        diff = np.abs(image[i].astype(np.int16) - background[i].astype(np.int16)).max(axis=-1)
        _ = (diff[m] > 24).mean()
        lo, hi = float(min(sal[i].min(), sal[n + i].min())), float(max(sal[i].max(), sal[n + i].max()))
        si, sb = (sal[i] - lo) / max(hi - lo, 1e-9), (sal[n + i] - lo) / max(hi - lo, 1e-9)
        ring = (dilated[i] > 0) & ~m
        ref = m & (si >= np.quantile(si, 0.85))
        ref = ref if ref.any() else m
        if ring.any():
            _ = (sb[ref].mean() - sb[ring].mean()) / max(si[ref].mean() - si[ring].mean(), 1e-6)
        _ = float(np.dot(emb[i], emb[n + i]))
        fg, bg = batch["fg_depth"][i][m].astype(np.float64), batch["bg_depth"][i][m].astype(np.float64)
        _ = ((fg > bg).mean(), (fg - bg).mean())
        mask_shape(mask[i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/build/tiny.yaml")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="inpainting steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the photos; the median pass is reported")
    args = ap.parse_args()

    import torch

    from cnc.config import load_config
    from cnc_model.training.tiny_data import synthetic_photos
    from triplets.builder import TripletBuilder
    from triplets.config import BuildConfig
    from triplets.readers import read_items

    torch.set_num_threads(1)
    common = [f"resolution={args.resolution}", f"min_side={min(64, args.resolution)}", f"batch_size={args.batch_size}",
              f"inpaint.num_inference_steps={args.steps}", f"device={args.device}", "segment.min_area=0.0",
              "segment.max_area=1.0"]
    on = TripletBuilder(load_config(BuildConfig, args.config, common))
    off = TripletBuilder(load_config(BuildConfig, args.config, common + ["quality.enabled=false"]))
    with tempfile.TemporaryDirectory() as tmp:
        items = read_items(str(synthetic_photos(tmp, args.images)))
        chunks = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
        decoded = [on.decode(c) for c in chunks]
        for b in (on, off):
            b.run_models(decoded[0])  # warm-up
        runs = collections.defaultdict(list)
        seconds = {"on": collections.Counter(), "off": collections.Counter()}
        for _ in range(args.repeats):
            for name, builder in (("off", off), ("on", on)):
                t = time.perf_counter()
                outs = [builder.run_models(b, seconds[name]) for b in decoded]
                runs[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            for b in outs:
                v1_model_thread_work(on, b)
            runs["v1"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for b in outs:
                on.assemble(b)
            runs["stats"].append(time.perf_counter() - t)
    n = args.images
    med = {k: stats.median(v) / n for k, v in runs.items()}
    per = {k: {s: v / (n * args.repeats) for s, v in c.items()} for k, c in seconds.items()}
    # what scoring adds to the model thread: its own stage, plus whatever the depth stage does for it (reuse: 0)
    added_v2 = per["on"].get("quality", 0.0) + max(per["on"]["depth"] - per["off"]["depth"], 0.0)
    total = sum(seconds["on"].values())
    print(f"{n} images at {args.resolution} px, batch {args.batch_size}, {args.steps} inpainting steps, {args.config} "
          f"on {args.device}, torch threads 1, median of {args.repeats} passes; depth stage D(I): "
          f"{on.model_stages[2].image_disparity}")
    print("\n| quality scores | model thread s/triplet | off the model thread s/triplet |\n|---|---|---|")
    print(f"| version 1 (re-enacted: saliency on I and I_b, CLIP on PIL crops, stats) | {med['v1']:.4f} | 0 |")
    print(f"| version 2 (quality stage + depth-stage difference; statistics in the encode threads) | "
          f"{added_v2:.4f} | {med['stats']:.4f} |")
    print(f"\nmodel thread: version 1 / version 2 = {med['v1'] / max(added_v2, 1e-9):.1f}x; depth stage "
          f"{1000 * per['on']['depth']:.1f} ms/triplet with scores, {1000 * per['off']['depth']:.1f} without; whole "
          f"model loop {med['on']:.4f} s/triplet with scores, {med['off']:.4f} without (wall, shared machine)")
    print("\n| stage (scores on) | ms/triplet | share of model time |\n|---|---|---|")
    for stage, s in seconds["on"].items():
        print(f"| {stage} | {1000 * s / (n * args.repeats):.1f} | {s / total:.0%} |")


if __name__ == "__main__":
    main()

"""Before/after of issue 29's changes where a CPU can show them, measured in one run (ratios, same inputs).

    .venv/bin/python benchmarks/host_work.py                 # ~1-2 min on 2 CPUs
    .venv/bin/python benchmarks/host_work.py --json host_work.json

Each row times the replaced code path and its replacement on the CPU (torch on ``--threads`` threads):

* depth quantisation of a batch of 2N 512² maps: NumPy float64 map by map (before; still the CPU path) vs the
  accelerator path of :func:`triplets.sample.quantize_depth_batch` run on the CPU (on a GPU it runs where the maps
  are and 16-bit integers come back; on a CPU it is slower, hence NumPy there);
* SAM candidate choice of N images × 3 candidates at 512²: the NumPy loop (before; still the CPU path) vs the
  accelerator path of :func:`triplets.stages.segment.select_candidates` run on the CPU (on a GPU only the chosen
  masks are copied back);
* saliency priors + prompts of N 512² maps: one after the other (before) vs on a thread pool (after; the GPU build's
  host pool; on a busy shared CPU the gain is bounded by the free cores);
* SAM prompt encoder + mask decoder of N images (ViT-H decoder size): image by image vs batched;
* one global attention block of SAM ViT-H (64×64 tokens, 16 heads of 80, batch 1): the dense (heads, 4096²) bias
  mask vs the bias folded into q·k (on a GPU the point is the flash kernel; here: time and the bias bytes avoided);
* AdamW over the trainable parameters of the CnC fusers (506 M): ``foreach`` vs ``fused`` (one step).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _time(fn, reps: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1000 * (time.perf_counter() - t) / reps


def depth(n: int, r: int = 512) -> dict:
    import torch

    from triplets.sample import DEPTH_MAX, _quantize_on_device

    maps = np.random.default_rng(0).standard_normal((2 * n, r, r)).astype(np.float32)

    def before():
        for m in maps:
            d = m.astype(np.float64)
            lo, hi = float(d.min()), float(d.max())
            np.isfinite(d).all()
            np.round((d - lo) / (hi - lo) * DEPTH_MAX).astype(np.uint16)

    t = torch.from_numpy(maps)
    return {"what": f"depth quantisation, {2 * n} maps of {r}²: NumPy vs the accelerator path on the CPU",
            "before_ms": _time(before), "after_ms": _time(lambda: _quantize_on_device(t))}


def candidates(n: int, r: int = 512) -> dict:
    import torch

    from triplets.stages.segment import _select_on_device

    rng = np.random.default_rng(0)
    cands = rng.random((n, 3, r, r)) < rng.uniform(0.05, 0.5, (n, 3, 1, 1))
    scores = rng.random((n, 3)).astype(np.float32)
    ct, st = torch.from_numpy(cands), torch.from_numpy(scores)

    def before():
        for i in range(n):
            for j in np.argsort(-scores[i], kind="stable"):
                if 0.01 <= float(cands[i, j].mean()) <= 0.95:
                    cands[i, j].astype(np.uint8)
                    break

    return {"what": f"SAM candidate choice, {n} images × 3 at {r}²: NumPy vs the accelerator path on the CPU",
            "before_ms": _time(before), "after_ms": _time(lambda: _select_on_device(ct, st, 0.01, 0.95))}


def priors(n: int, r: int = 512, threads: int = 2) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from triplets.stages.segment import prior_prompt, saliency_prior

    maps = [np.random.default_rng(i).standard_normal((r, r)).astype(np.float32) for i in range(n)]

    def one(d):
        p = saliency_prior(d, 0.85)
        return prior_prompt(p, d)

    with ThreadPoolExecutor(threads) as pool:
        after = _time(lambda: list(pool.map(one, maps)), reps=3)
    return {"what": f"saliency priors + prompts, {n} maps of {r}², inline vs {threads} host threads",
            "before_ms": _time(lambda: [one(d) for d in maps], reps=3), "after_ms": after}


def decoder(n: int) -> dict:
    import torch
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    from triplets.stages.sam_batch import decode_masks

    torch.manual_seed(0)
    pe = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                       mask_in_chans=16)
    dec = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                                                                            mlp_dim=2048, num_heads=8),
                      transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    sam = type("S", (), {"prompt_encoder": pe, "mask_decoder": dec})()
    feats, coords = torch.randn(n, 256, 64, 64), torch.rand(n, 1, 2) * 1024
    boxes = torch.sort(torch.rand(n, 4) * 1024, dim=1).values
    one = torch.ones(1, 1, dtype=torch.int)

    def before():
        for i in range(n):
            sp, de = pe(points=(coords[i:i + 1], one), boxes=boxes[i:i + 1], masks=None)
            dec(image_embeddings=feats[i:i + 1], image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sp,
                dense_prompt_embeddings=de, multimask_output=True)

    with torch.inference_mode():
        return {"what": f"SAM prompt encoder + mask decoder (ViT-H size), {n} images", "before_ms": _time(before, 3),
                "after_ms": _time(lambda: decode_masks(sam, feats, coords, boxes), 3)}


def attention() -> dict:
    import torch
    from segment_anything.modeling.image_encoder import Attention

    from triplets.stages.sam_batch import _folded_forward, _sdpa_forward

    torch.manual_seed(0)
    attn = Attention(1280, num_heads=16, qkv_bias=True, use_rel_pos=True, input_size=(64, 64)).eval()
    x = torch.randn(1, 64, 64, 1280)
    with torch.inference_mode():
        bias = _time(lambda: _sdpa_forward(attn, x), 2)
        folded = _time(lambda: _folded_forward(attn, x), 2)
    return {"what": "SAM ViT-H global attention block (1 × 4096 tokens), dense bias vs folded",
            "before_ms": bias, "after_ms": folded, "bias_mb_avoided": 16 * 4096 * 4096 * 4 / 1e6}


def adamw() -> dict:
    import torch

    from cnc import architectures as arch
    from cnc_model.models.global_fuser import GlobalFuser
    from cnc_model.models.local_fuser import LocalFuser

    with torch.device("meta"):
        fusers = (LocalFuser.from_unet(arch.sd_unet()), GlobalFuser(768, 768, 4))
    shapes = [p.shape for m in fusers for p in m.parameters()]
    out = {"what": f"AdamW step over the fusers' {sum(int(np.prod(s)) for s in shapes) / 1e6:.0f} M parameters"}
    for name, kw in (("before_ms", {"foreach": True}), ("after_ms", {"fused": True})):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt = torch.optim.AdamW(params, lr=1e-5, **kw)
        out[name] = _time(opt.step, 2)
        del params, opt
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="build batch size N")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--skip", nargs="*", default=[], help="depth candidates priors decoder attention adamw")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    parts = {"depth": lambda: depth(args.batch), "candidates": lambda: candidates(args.batch),
             "priors": lambda: priors(args.batch), "decoder": lambda: decoder(args.batch), "attention": attention,
             "adamw": adamw}
    rows = []
    for name, fn in parts.items():
        if name in args.skip:
            continue
        row = fn()
        row["ratio"] = row["before_ms"] / row["after_ms"]
        rows.append(row)
        print(f"{row['what']}: before {row['before_ms']:.1f} ms, after {row['after_ms']:.1f} ms "
              f"({row['ratio']:.2f}×)", flush=True)
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch threads {args.threads}")
    print("| change | before ms | after ms | before / after |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['before_ms']:.1f} | {r['after_ms']:.1f} | {r['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

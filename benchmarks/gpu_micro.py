"""Micro-benchmarks of the two models that cost most, and of the inpainting loop's host syncs (GPU; ``--tiny`` on CPU).

    python benchmarks/gpu_micro.py --out micro.json --budget-s 90            # GPU, real-size random weights
    python benchmarks/gpu_micro.py --tiny --out micro.json --budget-s 60     # CPU smoke (tiny models)

Every number is written to ``--out`` as soon as it exists (a run stopped by a time limit keeps what it measured):

* ``matmul``: the bf16 and fp16 8192² matmul peak (the MFU denominator);
* ``unet``: the SD-inpainting UNet alone (:func:`cnc.architectures.sd_inpaint_unet`) in fp16: FLOPs per sample
  counted on meta (:mod:`triplets.flops`), ms per evaluation, TFLOP/s and MFU at CFG batch 8 / 16 / 32 (a build
  batch of 4 / 8 / 16), eager vs ``channels_last`` vs ``torch.compile`` (when the budget leaves ≥ 150 s), and the
  cost of a host sync after every evaluation (what diffusers' PNDM step forces);
* ``inpaint``: the inpainting stage as the build runs it (``--models-dir`` from the suite), stock PNDM vs the
  sync-free scheduler: ms per batch and host syncs per batch (``torch.cuda.set_sync_debug_mode``);
* ``sam``: the SAM ViT-H image encoder at batch 4: fp32 weights under autocast with the dense bias (shipped), the
  folded (flash-eligible) attention, fp16 weights, both; and its prompt encoder + mask decoder image by image vs
  batched (:func:`triplets.stages.sam_batch.decode_masks`).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path


class Micro:
    def __init__(self, out: Path | None, budget_s: float, tiny: bool):
        import torch

        self.out, self.budget, self.t0 = out, budget_s, time.perf_counter()
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
        self.tiny = tiny
        self.res: dict = {"device": torch.cuda.get_device_name() if self.dev.type == "cuda" else "cpu",
                          "torch": torch.__version__}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.res["seconds"] = round(time.perf_counter() - self.t0, 1)
        if self.out:
            self.out.write_text(json.dumps(self.res, indent=1, default=float))

    def sync(self) -> None:
        import torch

        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def timeit(self, fn, seconds: float = 1.5, min_reps: int = 3, sync_each: bool = False) -> float:
        """ms per call of ``fn`` (after 2 warm-up calls; ``--tiny``: a tenth of the time)."""
        if self.tiny:
            seconds, min_reps = seconds / 10, 1
        for _ in range(2):
            fn()
        self.sync()
        k, t0 = 0, time.perf_counter()
        while k < min_reps or time.perf_counter() - t0 < seconds:
            fn()
            k += 1
            if sync_each:
                self.sync()
        self.sync()
        return 1000 * (time.perf_counter() - t0) / k

    def row(self, section: str, row: dict) -> None:
        self.res.setdefault(section, {}).setdefault("runs", []).append(row)
        print(json.dumps({section: row}), flush=True)
        self.save()


def matmul(m: Micro) -> None:
    import torch

    n = 8192 if m.dev.type == "cuda" else 512
    for dtype in ((torch.bfloat16, torch.float16) if m.dev.type == "cuda" else (torch.float32,)):
        a, b = torch.randn(n, n, device=m.dev, dtype=dtype), torch.randn(n, n, device=m.dev, dtype=dtype)
        ms = m.timeit(lambda: a @ b, seconds=1.0)  # noqa: B023 - used at once
        tflops = float(f"{2 * n**3 / ms / 1e9:.4g}")
        m.res.setdefault("matmul", {})[str(dtype).replace("torch.", "")] = tflops
        m.save()


def _peak_tflops(m: Micro) -> float:
    mm = m.res.get("matmul", {})
    return mm.get("bfloat16", mm.get("float32", float("nan")))


def unet(m: Micro) -> None:
    import torch

    from triplets.flops import unet_call

    if m.tiny:
        from cnc.tiny import tiny_unet

        model, lat, batches, dtype = tiny_unet(9), 8, [2, 4], torch.float32
    else:
        from cnc.architectures import sd_inpaint_unet

        with m.dev:
            model = sd_inpaint_unet()
        lat, batches, dtype = 64, [8, 16, 32], torch.float16
    flop, _ = unet_call(model, (lat, lat))
    model = model.to(m.dev, dtype).eval()
    ctx_dim = model.config.cross_attention_dim
    m.res["unet"] = {"flop_per_sample": flop, "latent": lat, "dtype": str(dtype), "runs": []}
    t = torch.tensor(500, device=m.dev)
    peak = _peak_tflops(m)

    def bench(name: str, net, bs: int, channels_last: bool = False, sync_each: bool = False) -> None:
        x = torch.randn(bs, 9, lat, lat, device=m.dev, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        c = torch.randn(bs, 77, ctx_dim, device=m.dev, dtype=dtype)
        with torch.inference_mode():
            ms = m.timeit(lambda: net(x, t, encoder_hidden_states=c), sync_each=sync_each)
        tflops = flop * bs / ms / 1e9
        m.row("unet", {"run": name, "cfg_batch": bs, "ms_per_eval": round(ms, 3), "tflops": float(f"{tflops:.4g}"),
                       "mfu": float(f"{tflops / peak:.4g}")})

    for bs in batches:
        if m.left() > 10:
            bench("eager", model, bs)
    if m.left() > 10:
        bench("eager, host sync after every evaluation (stock PNDM)", model, batches[0], sync_each=True)
    if m.left() > 15:
        model = model.to(memory_format=torch.channels_last)
        for bs in batches[:2]:
            bench("channels_last", model, bs, channels_last=True)
    if not m.tiny and m.left() > 150:  # a real UNet compiles in ~1-2 min (a CPU takes minutes even for a tiny one)
        t0 = time.perf_counter()
        compiled = torch.compile(model)
        try:
            x = torch.randn(batches[0], 9, lat, lat, device=m.dev, dtype=dtype).to(memory_format=torch.channels_last)
            with torch.inference_mode():
                compiled(x, t, encoder_hidden_states=torch.randn(batches[0], 77, ctx_dim, device=m.dev, dtype=dtype))
            m.sync()
            m.res["unet"]["compile_s"] = round(time.perf_counter() - t0, 1)
            bench("torch.compile (default), channels_last", compiled, batches[0], channels_last=True)
        except Exception as exc:  # noqa: BLE001 - reported, the other numbers stay
            m.res["unet"]["compile_error"] = f"{type(exc).__name__}: {exc}"[:400]
            m.save()


def inpaint_syncs(m: Micro, models_dir: Path | None) -> None:
    """The inpainting stage, stock PNDM vs sync-free: ms per batch and host syncs per batch."""
    import numpy as np
    import torch
    from diffusers import PNDMScheduler

    from cnc.tiny import synthetic_photo
    from triplets.stages.inpaint import InpaintStage

    if m.tiny:
        from cnc.hub import TINY, resolve_pretrained

        model, r, n, steps = resolve_pretrained(TINY, "inpaint.model"), 64, 2, 3
    else:
        path = (models_dir or Path("/nonexistent")) / "sd-inpainting"
        if not path.is_dir():
            m.res["inpaint"] = {"skipped": f"no {path} (the suite writes it)"}
            m.save()
            return
        model, r, n, steps = str(path), 512, 4, 25
    stage = InpaintStage(model, num_inference_steps=steps, device=str(m.dev))
    rows = {"image": np.stack([synthetic_photo(i, r, r) for i in range(n)]),
            "key": np.array([f"k{i}" for i in range(n)], dtype=object), "mask": np.zeros((n, r, r), np.uint8)}
    rows["mask"][:, r // 4:r // 2, r // 3:2 * r // 3] = 1
    sync_free = stage.pipe.scheduler
    stock = PNDMScheduler.from_config(sync_free.config)
    m.res["inpaint"] = {"batch": n, "steps": steps, "resolution": r, "runs": []}
    for name, sched in (("sync-free PNDM (shipped)", sync_free), ("stock PNDM", stock)):
        if m.left() < 15:
            break
        stage.pipe.scheduler = sched
        ms = m.timeit(lambda: stage.process(rows), seconds=2.0, min_reps=2)
        syncs = None
        if m.dev.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    stage.process(rows)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
        m.row("inpaint", {"run": name, "ms_per_batch": round(ms, 2), "host_syncs_per_batch": syncs})


def sam(m: Micro) -> None:
    import torch

    from triplets.stages.sam_batch import use_sdpa_attention

    if m.tiny:
        from cnc.tiny import tiny_sam

        build, bs = tiny_sam, 2
    else:
        from cnc.architectures import sam_vit_h as build

        bs = 4
    flop = None
    rows = []
    for name, attention, weights in (("autocast over fp32 weights, dense bias (shipped)", "bias", "autocast"),
                                     ("autocast over fp32 weights, folded attention", "folded", "autocast"),
                                     ("fp16 weights, dense bias", "bias", "weights"),
                                     ("fp16 weights, folded attention", "folded", "weights")):
        if m.left() < 20:
            break
        with m.dev:
            model = build().eval()
        use_sdpa_attention(model, attention)
        enc = model.image_encoder
        if flop is None:
            from triplets.flops import sam_encoder_call

            flop = sam_encoder_call(model)[0]
            m.res["sam"] = {"encoder_flop_per_image": flop, "batch": bs, "runs": rows}
        px = torch.randn(bs, 3, enc.img_size, enc.img_size, device=m.dev)
        reduced = torch.float16 if m.dev.type == "cuda" else torch.bfloat16
        if weights == "weights":
            enc.to(reduced)
            px = px.to(reduced)

            def run(enc=enc, px=px):
                return enc(px)
        else:
            def run(enc=enc, px=px, reduced=reduced):
                with torch.autocast(m.dev.type, dtype=reduced):
                    return enc(px)
        if m.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            ms = m.timeit(run)
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if m.dev.type == "cuda" else None
        m.row("sam", {"run": name, "ms_per_batch": round(ms, 2), "ms_per_image": round(ms / bs, 2),
                      "tflops": round(flop * bs / ms / 1e9, 3), "peak_gib": peak})
        if weights == "autocast" and attention == "bias" and m.left() > 15:
            sam_decoder(m, model, bs, reduced)
        del model, enc, px, run
        if m.dev.type == "cuda":
            torch.cuda.empty_cache()


def sam_decoder(m: Micro, model, bs: int, dtype) -> None:
    """Prompt encoder + mask decoder of ``bs`` images: image by image (as before) vs batched (shipped)."""
    import torch

    from triplets.stages.sam_batch import decode_masks

    pe, dec, size = model.prompt_encoder, model.mask_decoder, model.image_encoder.img_size
    feats = torch.randn(bs, pe.embed_dim, *pe.image_embedding_size, device=m.dev)
    coords = torch.rand(bs, 1, 2, device=m.dev) * size
    boxes = torch.sort(torch.rand(bs, 4, device=m.dev) * size, dim=1).values
    one = torch.ones(1, 1, dtype=torch.int, device=m.dev)

    def per_image():
        for i in range(bs):
            sp, de = pe(points=(coords[i:i + 1], one), boxes=boxes[i:i + 1], masks=None)
            dec(image_embeddings=feats[i:i + 1], image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sp,
                dense_prompt_embeddings=de, multimask_output=True)

    with torch.inference_mode(), torch.autocast(m.dev.type, dtype=dtype, enabled=m.dev.type == "cuda"):
        ms_loop = m.timeit(per_image, seconds=1.0)
        ms_batch = m.timeit(lambda: decode_masks(model, feats, coords, boxes), seconds=1.0)
    m.res["sam"]["decoder_ms_per_batch"] = {"per_image": round(ms_loop, 3), "batched (shipped)": round(ms_batch, 3)}
    m.save()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (the smoke path)")
    p.add_argument("--budget-s", type=float, default=90.0, help="parts are skipped past this many seconds")
    p.add_argument("--models-dir", type=Path, help="the suite's real-size models (for the inpainting stage)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_micro needs a CUDA GPU (torch.cuda.is_available() is False); --tiny runs the CPU path")
        raise SystemExit(2)
    m = Micro(args.out, args.budget_s, args.tiny)
    if args.tiny:
        torch.set_num_threads(1)
    for part in (matmul, unet, lambda m: inpaint_syncs(m, args.models_dir), sam):
        if m.left() < 10:
            break
        try:
            part(m)
        except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others
            name = getattr(part, "__name__", "part")
            m.res.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {exc}"[:500])
            m.save()
    m.save()
    print("micro done in", m.res["seconds"], "s")
    return m.res


if __name__ == "__main__":
    main()

"""Throughput of the shard builder: a plain loop vs ``cnc build`` on Ray.

CPU mode (default; tiny random models, synthetic photos, no network)::

    .venv/bin/python benchmarks/build_throughput.py --images 24 --resolution 128 --workers 1 2

measures samples/s of
  (a) a plain single-process loop over the same stages (``TripletBuilder`` on every shard spec +
      ``write_shard``), torch threads = 1;
  (b) ``cnc build`` (:func:`pipelines.build.build_entry`, what the CLI runs) with 1 and 2 Ray
      workers, torch threads = 1 per worker,
and prints each as a ratio to (a). Three numbers per run:

* *steady*: samples/s with every worker busy = sum over workers of (items / busy seconds), a
  worker's busy seconds being the sum of its shards' ``seconds`` (decode, models, encode, write,
  commit; model loading and Ray start-up excluded). For (a): items / loop seconds.
* *window*: items / (last shard commit - first shard start): includes workers that are still
  loading their models while others already work (dominant for short runs).
* *end to end*: items / wall time of the whole command (Ray start, model loading, plan, manifest).
* *cpu ms/sample*: CPU time of the loop / of the worker processes per sample (all their threads;
  Ray's own daemons not included): robust to other load on the machine, unlike the wall-clock rates.
 The tars of (a) and (b) must be
byte-identical (same shard specs, batch size and seeds); the script checks it.

GPU mode (needs CUDA; real-size architectures with random weights, built from the published
configs: SD-inpainting UNet/VAE/CLIP-L text, DPT-large, CLIP ViT-L/14 vision, SAM ViT-H)::

    .venv/bin/python benchmarks/build_throughput.py --gpu --images 64 --resolution 512

reports triplets/s/GPU and per-stage seconds per sample, fp16 batched vs the reference style
(fp32, batch 1).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("build_throughput")


def synthetic_photos(root: Path, n: int, size: tuple[int, int] = (180, 240)) -> Path:
    """``n`` textured JPEGs (gradient + noise background, one bright blob) in ``root``."""
    from PIL import Image

    from cnc.tiny import synthetic_photo

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(synthetic_photo(i, *size)).save(root / f"img_{i:04d}.jpg", quality=90)
    return root


def synthetic_triplets(n: int, resolution: int, key_format: str = "s{:05d}", seed: int = 0) -> list:
    """``n`` well-formed :class:`triplets.sample.TripletSample` of side ``resolution`` without any model: seeded
    photos, noisy gradient uint16 depths, a centred square mask, the flipped photo as background, random 768-d
    embeddings (for the writer and loader benchmarks)."""
    import numpy as np

    from cnc.tiny import synthetic_photo
    from triplets.sample import TripletSample

    rng = np.random.default_rng(seed)
    r = resolution
    gradient = np.linspace(0, 65535, r * r).reshape(r, r)
    mask = np.zeros((r, r), np.uint8)
    mask[r // 4:3 * r // 4, r // 4:3 * r // 4] = 1
    out = []
    for i in range(n):
        key, img = key_format.format(i), synthetic_photo(i, r, r)
        depth = (gradient + rng.normal(0, 300, (r, r))).clip(0, 65535).astype(np.uint16)
        meta = {"key": key, "source": "synthetic", "original_size": [r, r], "crop_box": [0, 0, 1, 1, 1],
                "resolution": r, "seed": i, "models": {}, "mask_area": 0.25, "fg_depth_range": [0, 1],
                "bg_depth_range": [0, 1], "timings": {}, "version": "bench"}
        out.append(TripletSample(key=key, image=img, mask=mask, background=img[::-1].copy(), fg_depth=depth,
                                 bg_depth=depth.T.copy(), fg_emb=rng.normal(size=768).astype(np.float32),
                                 bg_emb=rng.normal(size=768).astype(np.float32), caption=f"photo {i}", meta=meta))
    return out


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        model = platform.processor() or "?"
    return f"{model}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


# -- CPU ----------------------------------------------------------------------------------------
_BURN = ("import time\nt = time.perf_counter()\nx = 0\nfor i in range(8_000_000): x += i * i\n"
         "print(time.perf_counter() - t)")


def cpu_scaling() -> float:
    """Throughput of 2 parallel CPU-bound processes / 1 (≈ 2.0 on an idle 2-CPU machine): a contention probe."""
    def run(n: int) -> float:
        procs = [subprocess.Popen(["python3", "-c", _BURN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    return 2 * run(1) / run(2)


def plain_loop(cfg, src: Path, out: Path) -> dict:
    """(a): one process, one thread, the plan's shard specs, ``write_shard``."""
    import torch

    from pipelines.plan import make_plan
    from triplets.builder import TripletBuilder, resolve_models
    from triplets.readers import read_items
    from triplets.shardio import write_shard

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    builder = TripletBuilder(cfg, resolve_models(cfg))
    t_load, cpu0 = time.perf_counter(), time.process_time()
    plan = make_plan(read_items(str(src)), cfg, str(src), "folder")
    out.mkdir(parents=True)
    n = 0
    for spec in plan["shards"]:
        samples, failures = builder(spec["items"])
        write_shard(out / f"{spec['name']}.tar", samples, cfg.jpeg_quality)
        n += len(samples) + len(failures)
    t_end = time.perf_counter()
    return {"items": n, "steady_s": t_end - t_load, "e2e_s": t_end - t0, "load_s": t_load - t0,
            "cpu_s": time.process_time() - cpu0}


def ray_build(config: Path, src: Path, out: Path, overrides: list[str], workers: int) -> dict:
    """(b): ``build_entry`` (the CLI's function) with ``workers`` Ray workers, 1 torch thread each."""
    from pipelines.build import build_entry

    t0 = time.perf_counter()
    code = build_entry(str(config), str(src), str(out), overrides + [f"ray.num_workers={workers}",
                                                                     "ray.torch_threads=1"],
                       progress=False, summary=False)
    e2e = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"cnc build failed with exit code {code}")
    from triplets.shardio import BuildOutput

    markers = list(BuildOutput(str(out)).markers().values())
    per_worker: dict = collections.defaultdict(lambda: [0, 0.0])
    for m in markers:  # shards run one after the other inside a worker: busy time = sum of shard seconds
        per_worker[m.worker["pid"]][0] += m.nitems
        per_worker[m.worker["pid"]][1] += m.seconds
    items = sum(m.nitems for m in markers)
    rate = sum(n / s for n, s in per_worker.values())  # all workers busy, model loading excluded
    window = max(m.finished_at for m in markers) - min(m.started_at for m in markers)
    load = max(m.worker["load_seconds"] for m in markers)
    return {"items": items, "steady_s": items / rate, "window_s": window, "e2e_s": e2e, "load_s": load,
            "workers_used": len(per_worker), "cpu_s": sum(m.cpu_seconds for m in markers)}


def shas(folder: Path) -> dict[str, str]:
    from triplets.shardio import file_sha256

    return {p.name: file_sha256(p) for p in sorted(folder.glob("*.tar"))}


def run_cpu(args: argparse.Namespace) -> None:
    from cnc.config import load_config
    from triplets.config import BuildConfig

    work = Path(tempfile.mkdtemp(prefix="cnc-bench-"))
    try:
        src = synthetic_photos(work / "photos", args.images)
        overrides = [f"resolution={args.resolution}", f"min_side={min(args.resolution, 64)}",
                     f"inpaint.num_inference_steps={args.steps}", f"samples_per_shard={args.samples_per_shard}",
                     f"batch_size={args.batch_size}", "device=cpu"]
        config = REPO / "configs" / "build" / "tiny.yaml"
        cfg = load_config(BuildConfig, config, overrides)
        probe_before = cpu_scaling()
        rows = [("plain loop (a)", plain_loop(cfg, src, work / "plain"))]
        for w in args.workers:
            rows.append((f"cnc build, {w} worker(s)", ray_build(config, src, work / f"ray{w}", overrides, w)))
        probe_after = cpu_scaling()
        base = rows[0][1]
        reference = shas(work / "plain")
        identical = all(shas(work / f"ray{w}") == reference for w in args.workers)
        print(f"\nmachine: {machine()}")
        print(f"input: {args.images} synthetic photos -> {args.resolution} px, tiny models, "
              f"{args.steps} inpainting steps, batch {args.batch_size}, {args.samples_per_shard} per shard; "
              f"torch threads = 1 per process/worker")
        print(f"{'run':28s} {'steady/s':>9s} {'ratio':>6s} {'window/s':>9s} {'ratio':>6s} {'e2e/s':>7s} "
              f"{'ratio':>6s} {'load s':>7s} {'cpu ms/sample':>14s}")
        for name, r in rows:
            steady, e2e = r["items"] / r["steady_s"], r["items"] / r["e2e_s"]
            window = r["items"] / r.get("window_s", r["steady_s"])
            print(f"{name:28s} {steady:9.2f} {steady / (base['items'] / base['steady_s']):6.2f} "
                  f"{window:9.2f} {window / (base['items'] / base['steady_s']):6.2f} "
                  f"{e2e:7.2f} {e2e / (base['items'] / base['e2e_s']):6.2f} {r['load_s']:7.1f} "
                  f"{1000 * r['cpu_s'] / r['items']:14.0f}")
        print(f"tars byte-identical between the plain loop and every Ray build: {identical}")
        print(f"contention probe (2 CPU-bound processes vs 1, ideal 2.0): {probe_before:.2f} before, "
              f"{probe_after:.2f} after; load average {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- GPU ----------------------------------------------------------------------------------------
def write_real_size_models(root: Path) -> dict[str, str]:
    """Random-weight models with the published architectures, saved where the stages can load them.

    Returns config overrides pointing every model key at them. Built on the GPU when there is one (random
    initialisation of ~2.4 B parameters takes minutes on a CPU, seconds on a GPU).
    """
    import torch

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return _write_real_size_models(root)


def _write_real_size_models(root: Path) -> dict[str, str]:
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from segment_anything import build_sam_vit_h
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
    )

    from cnc.tiny import tiny_scheduler, tiny_tokenizer

    paths = {"inpaint": root / "sd-inpainting", "dpt": root / "dpt-large", "clip": root / "clip-vit-large-patch14",
             "sam": root / "sam_vit_h.pth"}
    if not paths["inpaint"].exists():
        unet = UNet2DConditionModel(  # stable-diffusion-inpainting unet/config.json
            sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(  # SD vae/config.json
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14 text tower (SD 1.x text_encoder)
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"))
        pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(), unet=unet,
                                              scheduler=tiny_scheduler("pndm"), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(paths["inpaint"])
    if not paths["dpt"].exists():
        DPTForDepthEstimation(DPTConfig(  # Intel/dpt-large config.json (ViT-L/16 backbone, ~343 M parameters)
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=384,
            patch_size=16, backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024],
            fusion_hidden_size=256, qkv_bias=True)).save_pretrained(paths["dpt"])
        DPTImageProcessor(size={"height": 384, "width": 384}, keep_aspect_ratio=False, ensure_multiple_of=1,
                          image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(paths["dpt"])
    if not paths["clip"].exists():
        CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=224,
            patch_size=14, projection_dim=768, hidden_act="quick_gelu")).save_pretrained(paths["clip"])
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            paths["clip"])
    if not paths["sam"].exists():
        torch.save({k: v.cpu() for k, v in build_sam_vit_h(checkpoint=None).state_dict().items()}, paths["sam"])
    return {"inpaint.model": str(paths["inpaint"]), "depth.model": str(paths["dpt"]),
            "segment.saliency_model": str(paths["dpt"]), "embed.model": str(paths["clip"]),
            "segment.sam_checkpoint": str(paths["sam"]), "segment.sam_model_type": "vit_h"}


def gpu_pass(cfg, items: list[dict]) -> dict:
    """Run every stage over ``items`` on the GPU; per-stage seconds (synchronised) and triplets/s."""
    import torch

    from triplets.batch import ensure_status
    from triplets.builder import TripletBuilder, resolve_models
    from triplets.sample import encode_sample

    builder = TripletBuilder(cfg, resolve_models(cfg), device="cuda")
    warm = items[: cfg.batch_size]
    builder(warm)  # cudnn autotune, lazy init
    torch.cuda.synchronize()
    stage_s: collections.Counter = collections.Counter()
    ok = 0
    t0 = time.perf_counter()
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i:i + cfg.batch_size]
        batch = ensure_status({k: [it.get(k) for it in chunk] for k in ("key", "source", "caption", "mask_path",
                                                                         "mask_kind")})
        for stage in builder.stages:
            t = time.perf_counter()
            batch = stage(batch)
            torch.cuda.synchronize()
            stage_s[stage.name] += time.perf_counter() - t
        t = time.perf_counter()
        samples, _ = builder.assemble(batch)
        for s in samples:
            encode_sample(s, cfg.jpeg_quality)
        stage_s["encode"] += time.perf_counter() - t
        ok += len(samples)
    wall = time.perf_counter() - t0
    del builder
    torch.cuda.empty_cache()
    return {"triplets": ok, "seconds": wall, "per_s": ok / wall,
            "stage_ms_per_sample": {k: 1000 * v / max(1, len(items)) for k, v in sorted(stage_s.items())},
            "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def run_gpu(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        log.error("--gpu needs a CUDA GPU (torch.cuda.is_available() is False); run the CPU benchmark instead")
        raise SystemExit(2)
    from cnc.config import load_config
    from triplets.config import BuildConfig
    from triplets.readers import read_items

    models_dir = Path(args.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    overrides = [f"{k}={v}" for k, v in write_real_size_models(models_dir).items()]
    work = Path(tempfile.mkdtemp(prefix="cnc-bench-gpu-"))
    try:
        src = synthetic_photos(work / "photos", args.images, size=(args.resolution + 64, args.resolution + 128))
        items = read_items(str(src))
        common = overrides + [f"resolution={args.resolution}", f"min_side={min(args.resolution, 256)}",
                              f"inpaint.num_inference_steps={args.steps}", "device=cuda"]
        config = REPO / "configs" / "build" / "default.yaml"
        runs = {
            f"fp16, batch {args.gpu_batch_size}": load_config(BuildConfig, config, common + [
                "dtype=float16", f"batch_size={args.gpu_batch_size}"]),
            "reference style: fp32, batch 1": load_config(BuildConfig, config, common + ["dtype=float32",
                                                                                         "batch_size=1"]),
        }
        results = {name: gpu_pass(cfg, items) for name, cfg in runs.items()}
        print(f"\nmachine: {machine()}; GPU: {torch.cuda.get_device_name(0)}")
        print(f"input: {args.images} synthetic photos at {args.resolution} px, {args.steps} inpainting steps, "
              f"real-size random-weight models (SD-inpainting, DPT-large x2, CLIP ViT-L/14, SAM ViT-H)")
        base = results["reference style: fp32, batch 1"]["per_s"]
        for name, r in results.items():
            stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stage_ms_per_sample"].items())
            print(f"{name:34s} {r['per_s']:.3f} triplets/s/GPU (x{r['per_s'] / base:.2f}), "
                  f"peak {r['max_mem_gb']:.1f} GiB; ms/sample: {stages}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="inpainting steps (CPU default 4; GPU: use 25)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples-per-shard", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ray-worker-niceness", type=int, default=0,
                   help="Ray starts workers at nice 15 by default, which starves them against other load on a shared "
                        "machine while the plain loop runs at nice 0; 0 compares like with like")
    p.add_argument("--gpu", action="store_true", help="real-size architectures on CUDA (fp16 batched vs fp32 batch 1)")
    p.add_argument("--gpu-batch-size", type=int, default=8)
    p.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "cnc-bench-models"),
                   help="where --gpu writes its random real-size models (~9 GB, reused)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)  # read by the raylet the build starts
    run_gpu(args) if args.gpu else run_cpu(args)


if __name__ == "__main__":
    main()

"""GPU efficiency suite (issue 15): the reference setting vs the project setting, in one run.

GPU (needs CUDA; random-weight real-size models built from the published configs, saved once under
``--models-dir``, loaded through the production ``from_pretrained`` paths; no downloads; ≈ 5–8 min on an H100)::

    .venv/bin/python benchmarks/gpu_suite.py --images 32 --out gpu_suite.json

CPU (tiny models, seconds; what ``tests/triplets/test_gpu_efficiency.py`` runs so the suite cannot rot)::

    .venv/bin/python benchmarks/gpu_suite.py --tiny --images 8 --resolution 64 --steps 2

Runs, on the same items and the same work (every run attempts every item in every stage):

* **reference**: fp32, batch 1, stage-major (each model over all items in turn, as separate scripts would), then
  encode + write in one thread; TF32 flags recorded as found;
* **project**: the config as shipped (``dtype: auto``, batch sizes, encode threads) through
  :class:`pipelines.worker.ShardWorker` (prefetch thread, model thread, writer thread with its encode pool);
* optional **variants** (``--variants batch16 batch32 two-workers compile compile-reduce-overhead``), each skipped
  when the remaining ``--budget-s`` would not cover it (estimated from the project run, + 150 s for a compilation);
  ``compile*`` is the shipped setting with ``compile: <mode>`` (torch.compile of the inpainting UNet; its compilation
  is in the run's ``warmup_s``, not in its triplets/s).

Per run: triplets/s and the ratio to the reference; items attempted/succeeded/failed per stage; per stage the
GPU-stream milliseconds between CUDA events around the stage call (GPU) and the CPU milliseconds of the model thread
inside it (``time.thread_time``); peak GPU memory (reset before each run); MFU = triplets/s × FLOP per triplet /
peak, with 45.7 TFLOP per 512² triplet for the real models (the issue's count; the tiny path counts its own FLOPs
with ``torch.utils.flop_counter``) and the peak a bf16 matmul (fp32 on CPU) reaches, measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_suite")
#: FLOP per 512² triplet of the real models (issue 15: UNet 0.677 T × 52, VAE 1.08 + 2.48, SAM ViT-H 5.96, DPT-L
#: 0.211 × 3, CLIP-L 0.156 × 2); the quality stage is not counted.
REAL_FLOP_PER_TRIPLET = 45.7e12
STAGES = ("segment", "inpaint", "depth", "embed", "quality")


# -- measurement -----------------------------------------------------------------------------------------------
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class StageClock:
    """Per-stage GPU-stream ms (CUDA events), model-thread CPU ms, wall ms and row counts; thread-safe."""

    def __init__(self):
        self.events: dict[str, list] = collections.defaultdict(list)
        self.cpu_ms: collections.Counter = collections.Counter()
        self.wall_ms: collections.Counter = collections.Counter()
        self.rows = {s: collections.Counter() for s in STAGES}
        self.lock = threading.Lock()

    def time(self, name: str, fn, batch: dict) -> dict:
        import torch

        from triplets.batch import healthy

        attempted = len(healthy(batch)) if "error" in batch else len(batch["key"])
        start = end = None
        if _cuda():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        c0, w0 = time.thread_time(), time.perf_counter()
        out = fn(batch)
        cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
        if end is not None:
            end.record()
        ok = len(healthy(out))
        with self.lock:
            if start is not None:
                self.events[name].append((start, end))
            self.cpu_ms[name] += 1000 * cpu
            self.wall_ms[name] += 1000 * wall
            self.rows[name].update(attempted=attempted, succeeded=ok, failed=attempted - ok)
        return out

    def gpu_ms(self) -> dict[str, float]:
        import torch

        if not _cuda():
            return {}
        torch.cuda.synchronize()
        return {k: sum(s.elapsed_time(e) for s, e in v) for k, v in self.events.items()}


class TimedStage:
    """A model stage seen through a :class:`StageClock` (what ``run_models`` calls; other attributes delegate)."""

    def __init__(self, stage, clock: StageClock):
        self._stage, self._clock = stage, clock

    def __call__(self, batch: dict) -> dict:
        return self._clock.time(self._stage.name, self._stage, batch)

    def __getattr__(self, name: str):
        return getattr(self._stage, name)


def matmul_peak(seconds: float = 2.0) -> tuple[float, str]:
    """Measured matmul FLOP/s: bf16 8192² on CUDA, fp32 512² on CPU (the dtype named in the result)."""
    import torch

    if _cuda():
        n, dtype, dev = 8192, torch.bfloat16, "cuda"
    else:
        n, dtype, dev = 512, torch.float32, "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(3):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        reps += 10
        if dev == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0), str(dtype).replace("torch.", "")


def count_flops(builder, items: list[dict]) -> float:
    """FLOP per triplet of the model stages (``torch.utils.flop_counter``) over ``items`` (tiny path)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        builder.run_models(builder.decode(items))
    return counter.get_total_flops() / max(1, len(items))


def real_flop_per_triplet(steps: int = 25, resolution: int = 512) -> float:
    """:data:`REAL_FLOP_PER_TRIPLET` for another step count (PNDM: steps + 1 UNet evaluations, × 2 for CFG) and
    resolution (everything but SAM, which always runs at 1024², scales with the pixel count; approximate)."""
    unet = 0.677e12 * 2 * (steps + 1)
    rest = REAL_FLOP_PER_TRIPLET - 0.677e12 * 52 - 5.96e12
    return (unet + rest) * (resolution / 512) ** 2 + 5.96e12


# -- runs ------------------------------------------------------------------------------------------------------
def _reset_memory() -> None:
    import torch

    if _cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if _cuda() else None


def _result(name: str, clock: StageClock, n_items: int, n_ok: int, seconds: float, extra: dict) -> dict:
    gpu = clock.gpu_ms()
    return {
        "run": name, "items": n_items, "triplets": n_ok, "seconds": round(seconds, 3),
        "triplets_per_s": n_ok / seconds if seconds else 0.0,
        "stage_rows": {k: dict(v) for k, v in clock.rows.items() if v},
        "gpu_ms_per_item": {k: round(v / n_items, 2) for k, v in gpu.items()},
        "cpu_ms_per_item": {k: round(v / n_items, 2) for k, v in clock.cpu_ms.items()},
        "wall_ms_per_item": {k: round(v / n_items, 2) for k, v in clock.wall_ms.items()},
        "peak_gib": _peak_gib(), **extra,
    }


def run_reference(cfg, resolved: dict, items: list[dict], out: Path) -> dict:
    """fp32, batch 1, stage-major; encode + write in one thread."""
    from triplets.builder import TripletBuilder
    from triplets.shardio import write_shard

    builder = TripletBuilder(cfg, resolved)
    builder.run_batch(items[:1])  # warm-up: lazy init, cuDNN autotune
    _reset_memory()
    clock = StageClock()
    t0 = time.perf_counter()
    c0 = time.thread_time()
    batches = [builder.decode([it]) for it in items]
    decode_cpu = time.thread_time() - c0
    for stage in builder.model_stages:  # each model over all items in turn
        batches = [clock.time(stage.name, stage, b) for b in batches]
    samples = [s for b in batches for s in builder.assemble(b)[0]]
    t = time.perf_counter()
    write_shard(out / "reference.tar", samples, cfg.jpeg_quality)
    write_s = time.perf_counter() - t
    if _cuda():
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return _result("reference: fp32, batch 1, stage-major", clock, len(items), len(samples), seconds,
                   {"decode_cpu_ms_per_item": round(1000 * decode_cpu / len(items), 2),
                    "encode_write_ms_per_item": round(1000 * write_s / len(items), 2)})


def _worker(cfg, resolved: dict, out: Path, clock: StageClock):
    import torch

    from pipelines.worker import ShardWorker

    worker = ShardWorker(cfg.model_dump(mode="json"), resolved, "gpu-suite", torch_threads=torch.get_num_threads(),
                         output=str(out))
    worker.builder.model_stages = [TimedStage(s, clock) for s in worker.builder.model_stages]
    return worker


def run_project(name: str, cfg, resolved: dict, items: list[dict], out: Path, workers: int = 1) -> dict:
    """The shipped path: ``ShardWorker.build_shard`` (prefetch, model and writer threads); ``workers`` model sets
    in threads of this process, one shard each (what ``ray.gpus_per_worker: 0.5`` runs as two actors)."""
    clock = StageClock()
    pool = [_worker(cfg, resolved, out / f"w{w}", clock) for w in range(workers)]
    t_warm = time.perf_counter()
    for w in pool:
        w.builder.run_batch(items[:cfg.batch_size])  # warm-up (and, with compile, the compilation)
    warmup_s = time.perf_counter() - t_warm
    clock.__init__()
    _reset_memory()
    share = -(-len(items) // workers)
    specs = [{"shard": w, "name": f"{w:06d}", "items": items[w * share:(w + 1) * share]} for w in range(workers)]
    markers: list[dict] = [None] * workers  # type: ignore[list-item]

    def build(w: int) -> None:
        markers[w] = pool[w].build_shard(specs[w])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=build, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if _cuda():
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    stage_s: collections.Counter = collections.Counter()
    for m in markers:
        stage_s.update(m.stage_seconds or {})
    ok = sum(m.nsamples for m in markers)
    return _result(name, clock, len(items), ok, seconds, {
        "warmup_s": round(warmup_s, 1), "decode_ms_per_item": round(1000 * stage_s["decode"] / len(items), 2),
        "encode_ms_per_item": round(1000 * stage_s["encode"] / len(items), 2),
        "write_ms_per_item": round(1000 * stage_s["write"] / len(items), 2)})


# -- driver ----------------------------------------------------------------------------------------------------
def configs(args: argparse.Namespace, models: dict[str, str]):
    from cnc.config import load_config
    from triplets.config import BuildConfig

    base = REPO / "configs" / "build" / ("tiny.yaml" if args.tiny else "default.yaml")
    common = [f"{k}={v}" for k, v in models.items()] + [
        f"resolution={args.resolution}", f"min_side={min(args.resolution, 256)}",
        f"inpaint.num_inference_steps={args.steps}", f"device={'cuda' if _cuda() and not args.tiny else 'cpu'}",
        f"samples_per_shard={args.images}"]
    ref = load_config(BuildConfig, base, common + ["dtype=float32", "batch_size=1", "ray.encode_threads=1"])
    project = load_config(BuildConfig, base, common)
    return ref, project


def run(args: argparse.Namespace) -> dict:
    import torch
    from build_throughput import synthetic_photos, write_real_size_models

    from triplets.builder import TripletBuilder, resolve_models
    from triplets.readers import read_items

    if not args.tiny and not _cuda():
        log.error("gpu_suite needs a CUDA GPU (torch.cuda.is_available() is False); --tiny runs the CPU path")
        raise SystemExit(2)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {} if args.tiny else write_real_size_models(Path(args.models_dir))
    work = Path(tempfile.mkdtemp(prefix="cnc-gpu-suite-"))
    try:
        src = synthetic_photos(work / "photos", args.images, size=(args.resolution + 16, args.resolution + 32))
        items = read_items(str(src))
        ref_cfg, proj_cfg = configs(args, models)
        resolved = resolve_models(proj_cfg)
        peak, peak_dtype = matmul_peak(0.5 if args.tiny else 3.0)
        if args.tiny:
            flop = count_flops(TripletBuilder(ref_cfg, resolved), items[:2])
        else:
            flop = real_flop_per_triplet(args.steps, args.resolution)
        runs = [run_reference(ref_cfg, resolved, items, work)]
        _save_partial(args, runs, flop, peak)
        runs.append(run_project(f"project: as shipped (dtype {proj_cfg.dtype}, batch {proj_cfg.batch_size})",
                                proj_cfg, resolved, items, work / "project"))
        _save_partial(args, runs, flop, peak)
        per_run = runs[-1]["seconds"]
        failed_variants: dict[str, str] = {}
        for variant in args.variants:
            compile_s = 150 if variant.startswith("compile") and not args.tiny else 0  # a real UNet's compilation
            if time.perf_counter() - t_start + 2.5 * per_run + compile_s > args.budget_s:
                log.warning("variant %s skipped: the --budget-s of %.0f s would be exceeded", variant, args.budget_s)
                continue
            try:
                if variant.startswith("batch"):
                    cfg = proj_cfg.model_copy(update={"batch_size": int(variant[5:])})
                    runs.append(run_project(f"variant: batch {cfg.batch_size}", cfg, resolved, items, work / variant))
                elif variant in ("compile", "compile-reduce-overhead", "compile-max-autotune"):
                    mode = variant.partition("-")[2] or "default"
                    cfg = proj_cfg.model_copy(update={"compile": mode})
                    runs.append(run_project(f"variant: torch.compile UNet ({mode})", cfg, resolved, items,
                                            work / variant))
                elif variant == "two-workers":
                    runs.append(run_project("variant: two model sets per device", proj_cfg, resolved, items,
                                            work / variant, workers=2))
                else:
                    log.warning("unknown variant %s (batchN | two-workers | compile[-reduce-overhead|-max-autotune])",
                                variant)
            except Exception as exc:  # noqa: BLE001 - a failed optional variant must not lose the other runs
                log.exception("variant %s failed", variant)
                failed_variants[variant] = f"{type(exc).__name__}: {exc}"[:500]
            _save_partial(args, runs, flop, peak)
        base = runs[0]["triplets_per_s"] or float("nan")
        for r in runs:
            r["ratio_to_reference"] = round(r["triplets_per_s"] / base, 3)
            r["mfu"] = round(r["triplets_per_s"] * flop / peak, 5)
        return {
            "device": torch.cuda.get_device_name(0) if _cuda() and not args.tiny else "cpu",
            "tiny": args.tiny, "images": args.images, "resolution": args.resolution, "steps": args.steps,
            "flop_per_triplet": flop, "matmul_peak_flops": peak, "matmul_peak_dtype": peak_dtype,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "runs": runs,
            "seconds": round(time.perf_counter() - t_start, 1), "failed_variants": failed_variants,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _save_partial(args: argparse.Namespace, runs: list[dict], flop: float, peak: float) -> None:
    """The runs so far (``"partial": true``), so a suite stopped by a time limit still leaves its measurements."""
    if args.out:
        Path(args.out).write_text(json.dumps({"partial": True, "flop_per_triplet": flop, "matmul_peak_flops": peak,
                                              "runs": runs}, indent=1, default=float))


def writer_bench(resolution: int = 512, samples: int = 16, threads: tuple[int, ...] = (1, 2, 4)) -> dict[int, float]:
    """Encode ms per sample (two JPEGs, a mask PNG, two uint16 depth PNGs) of the worker's writer with ``threads``
    encode threads (wall time of :meth:`ShardWorker._write`'s parallel encode over ``samples`` synthetic samples)."""
    from concurrent.futures import ThreadPoolExecutor

    from build_throughput import synthetic_triplets

    from triplets.sample import encode_sample

    batch = synthetic_triplets(samples, resolution, key_format="k{}")
    out = {}
    for n in threads:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(encode_sample, batch[:n]))  # warm-up
            t = time.perf_counter()
            list(pool.map(encode_sample, batch))
            out[n] = 1000 * (time.perf_counter() - t) / samples
    return out


def table(result: dict) -> str:
    """Markdown table of a suite result."""
    stages = [s for s in STAGES if any(s in r["cpu_ms_per_item"] for r in result["runs"])]
    head = ["run", "triplets/s", "ratio", "MFU", "peak GiB"] + [f"{s} GPU/CPU ms" for s in stages]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        cells = [r["run"], f"{r['triplets_per_s']:.3f}", f"{r['ratio_to_reference']:.2f}", f"{100 * r['mfu']:.1f} %",
                 "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"]
        for s in stages:
            g = r["gpu_ms_per_item"].get(s)
            cells.append(f"{'-' if g is None else f'{g:.1f}'} / {r['cpu_ms_per_item'].get(s, 0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (seconds; the path the tests run)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=25, help="inpainting steps (the reference: 25)")
    p.add_argument("--variants", nargs="*", default=[],
                   help="batch16 batch32 two-workers compile compile-reduce-overhead (in this order of cost)")
    p.add_argument("--budget-s", type=float, default=420.0, help="variants are skipped past this many seconds")
    p.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "cnc-bench-models"),
                   help="where the random real-size models are written once (~9 GB, reused)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every run (0: torch's default)")
    p.add_argument("--writer", action="store_true", help="only the writer: encode ms/sample at --resolution with "
                                                          "1, 2 and 4 encode threads")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.writer:
        ms = writer_bench(args.resolution)
        print(f"writer encode ms/sample at {args.resolution} px ({os.cpu_count()} CPUs): "
              + ", ".join(f"{n} thread(s) {v:.1f}" for n, v in ms.items()))
        return {"writer_encode_ms_per_sample": ms}
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"device: {result['device']}; {args.images} images at {args.resolution} px, {args.steps} steps; matmul peak "
          f"{result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s ({result['matmul_peak_dtype']}); "
          f"{result['flop_per_triplet'] / 1e9:.4g} GFLOP/triplet; torch threads {result['torch_threads']}; "
          f"TF32 {result['tf32']}")
    print(table(result))
    return result


if __name__ == "__main__":
    main()

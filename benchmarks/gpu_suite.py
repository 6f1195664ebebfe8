"""GPU efficiency suite (issue 15): the reference setting vs the project setting, in one run.

GPU (needs CUDA; random-weight real-size models built from the published configs, saved once under
``--models-dir``, loaded through the production ``from_pretrained`` paths; no downloads; ≈ 5–8 min on an H100)::

    .venv/bin/python benchmarks/gpu_suite.py --images 32 --out gpu_suite.json

CPU (tiny models, seconds; what the CPU smoke of ``make gpu-check`` runs so the suite cannot rot)::

    .venv/bin/python benchmarks/gpu_suite.py --tiny --images 8 --resolution 64 --steps 2

Runs, on the same items and the same work (every run attempts every item in every stage):

* **reference**: fp32, batch 1, stage-major (each model over all items in turn, as separate scripts would), then
  encode + write in one thread; TF32 flags recorded as found;
* **project**: the config as shipped (``dtype: auto``, batch sizes, encode threads) through
  :class:`pipelines.worker.ShardWorker` (prefetch thread, model thread, writer thread with its encode pool);
* **variants** (``--variants``; names joined by ``+`` combine, e.g. ``batch16+channels-last``), each skipped when the
  remaining ``--budget-s`` would not cover it (estimated from the project run, + 150 s for a compilation):
  :data:`VARIANTS` lists them: the candidates the shipped defaults do not use yet (batch sizes, ``channels_last``,
  ``torch.compile``, SAM's folded attention and fp16 weights, two model sets per GPU) and the "before" of each
  change the shipped defaults already made (``stock-pndm``: the host-syncing scheduler; ``host-inline``: per-image
  host work on the model thread).

Per run: triplets/s and the ratio to the reference; items attempted/succeeded/failed per stage; per stage the
GPU-stream milliseconds between CUDA events around the stage call (GPU) and the CPU milliseconds of the model thread
inside it (``time.thread_time``); peak GPU memory (reset before each run); MFU = triplets/s × FLOP per triplet /
peak. FLOP per triplet is counted model by model on the models this run loaded (:mod:`triplets.flops`: each model's
FLOPs counted by ``torch.utils.flop_counter`` on a meta copy at the input size it runs at, times its calls per
triplet; the table is in the JSON under ``flops``); the peak is what a bf16 8192² matmul reaches (fp32 512² on
CPU), measured in the same run. ``batch_choice`` names the batch size with the best triplets/s among the project
run and the ``batchN`` variants.
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
STAGES = ("segment", "inpaint", "depth", "embed", "quality")


def _stock_pndm(worker) -> None:
    from diffusers import PNDMScheduler

    for stage in worker.builder.model_stages:
        if stage.name == "inpaint":
            stage.pipe.scheduler = PNDMScheduler.from_config(stage.pipe.scheduler.config)


def _host_inline(worker) -> None:
    for stage in worker.builder.model_stages:
        stage.host_pool = None


#: Variant name → (config overrides, a hook applied to each loaded worker or None, what it measures).
VARIANTS: dict[str, tuple[list[str], object, str]] = {
    "channels-last": (["channels_last=true"], None, "inpainting UNet in NHWC"),
    "compile": (["compile=default"], None, "torch.compile of the UNet (default mode)"),
    "compile-reduce-overhead": (["compile=reduce-overhead"], None, "torch.compile, CUDA graphs"),
    "compile-max-autotune": (["compile=max-autotune"], None, "torch.compile, autotuned kernels"),
    "sam-folded": (["segment.sam_attention=folded"], None, "SAM attention without the dense bias (flash)"),
    "sam-fp16-weights": (["segment.sam_precision=weights"], None, "SAM image encoder in fp16 weights"),
    "stock-pndm": ([], _stock_pndm, "before: diffusers' PNDM with two host syncs per step"),
    "host-inline": ([], _host_inline, "before: per-image host work on the model thread"),
}


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


def flop_table(cfg, builder):
    """:class:`triplets.flops.FlopTable` of ``cfg`` with the models ``builder`` loaded."""
    from triplets.flops import models_of_builder, triplet_flops

    return triplet_flops(cfg, models_of_builder(builder))


# -- runs ------------------------------------------------------------------------------------------------------
def _reset_memory() -> None:
    import gc

    import torch

    gc.collect()
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


def run_reference(cfg, resolved: dict, items: list[dict], out: Path, builder=None) -> dict:
    """fp32, batch 1, stage-major; encode + write in one thread."""
    from triplets.builder import TripletBuilder
    from triplets.shardio import write_shard

    builder = builder or TripletBuilder(cfg, resolved)
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


def run_project(name: str, cfg, resolved: dict, items: list[dict], out: Path, workers: int = 1, hook=None) -> dict:
    """The shipped path: ``ShardWorker.build_shard`` (prefetch, model and writer threads); ``workers`` model sets
    in threads of this process, one shard each (what ``ray.gpus_per_worker: 0.5`` runs as two actors); ``hook(worker)``
    changes each loaded worker (a variant)."""
    clock = StageClock()
    t_load = time.perf_counter()
    pool = [_worker(cfg, resolved, out / f"w{w}", clock) for w in range(workers)]
    load_s = time.perf_counter() - t_load
    for w in pool:
        if hook is not None:
            hook(w)
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
    pool.clear()  # the models of this run are freed before the next run loads its own
    return _result(name, clock, len(items), ok, seconds, {
        "load_s": round(load_s, 1), "warmup_s": round(warmup_s, 1), "batch_size": cfg.batch_size,
        "decode_ms_per_item": round(1000 * stage_s["decode"] / len(items), 2),
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


def variant_config(base, variant: str):
    """``(config, hook, workers)`` of a variant name (``+`` combines; see :data:`VARIANTS`, ``batchN``,
    ``two-workers``)."""
    from cnc.config import apply_overrides
    from triplets.config import BuildConfig

    overrides, hooks, workers = [], [], 1
    for part in variant.split("+"):
        if part.startswith("batch") and part[5:].isdigit():
            overrides.append(f"batch_size={int(part[5:])}")
        elif part == "two-workers":
            workers = 2
        elif part in VARIANTS:
            overrides += VARIANTS[part][0]
            if VARIANTS[part][1] is not None:
                hooks.append(VARIANTS[part][1])
        else:
            raise ValueError(f"unknown variant {part!r}: batchN, two-workers, {', '.join(VARIANTS)}")
    cfg = BuildConfig.model_validate(apply_overrides(base.model_dump(mode="json"), overrides))

    def hook(worker) -> None:
        for h in hooks:
            h(worker)

    return cfg, hook, workers


def batch_choice(runs: list[dict], shipped: int) -> dict:
    """The batch size of the fastest run among the project run and the ``batchN`` variants (plain batch changes
    only), and whether it beats the shipped one by more than 5 % (else the default stays)."""
    plain = {r["batch_size"]: r["triplets_per_s"] for r in runs
             if r.get("variant", "").startswith("batch") and "+" not in r.get("variant", "")}
    project = next((r for r in runs if r["run"].startswith("project")), None)
    if project is not None:
        plain.setdefault(project["batch_size"], project["triplets_per_s"])
    if not plain:
        return {}
    best = max(plain, key=plain.get)
    gain = plain[best] / plain.get(shipped, plain[best]) - 1
    return {"measured": {str(k): round(v, 4) for k, v in sorted(plain.items())}, "best": best, "shipped": shipped,
            "gain_over_shipped": round(gain, 4), "change_default": best != shipped and gain > 0.05}


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
    models_s = round(time.perf_counter() - t_start, 1)
    work = Path(tempfile.mkdtemp(prefix="cnc-gpu-suite-"))
    try:
        src = synthetic_photos(work / "photos", args.images, size=(args.resolution + 16, args.resolution + 32))
        items = read_items(str(src))
        ref_cfg, proj_cfg = configs(args, models)
        resolved = resolve_models(proj_cfg)
        peak, peak_dtype = matmul_peak(0.5 if args.tiny else 3.0)
        ref_builder = TripletBuilder(ref_cfg, resolved)
        table = flop_table(proj_cfg, ref_builder)  # the models of this run, at the project's settings
        flop = table.total
        head = {"flop_per_triplet": flop, "matmul_peak_flops": peak, "flops": table.as_dict(), "models_s": models_s}
        runs = [run_reference(ref_cfg, resolved, items, work, ref_builder)]
        del ref_builder
        _save_partial(args, runs, head)
        runs.append(run_project(f"project: as shipped (dtype {proj_cfg.dtype}, batch {proj_cfg.batch_size})",
                                proj_cfg, resolved, items, work / "project"))
        _save_partial(args, runs, head)
        per_run = runs[-1]["seconds"] + runs[-1]["load_s"] + runs[-1]["warmup_s"]
        failed_variants: dict[str, str] = {}
        skipped: list[str] = []
        for variant in args.variants:
            compile_s = 150 if "compile" in variant and not args.tiny else 0  # a real UNet's compilation
            if time.perf_counter() - t_start + 1.5 * per_run + compile_s > args.budget_s:
                log.warning("variant %s skipped: the --budget-s of %.0f s would be exceeded", variant, args.budget_s)
                skipped.append(variant)
                continue
            try:
                cfg, hook, workers = variant_config(proj_cfg, variant)
                what = "; ".join(VARIANTS[p][2] if p in VARIANTS else p for p in variant.split("+"))
                runs.append(run_project(f"variant {variant}: {what}", cfg, resolved, items, work / variant,
                                        workers=workers, hook=hook))
                runs[-1]["variant"] = variant
            except Exception as exc:  # noqa: BLE001 - a failed optional variant must not lose the other runs
                log.exception("variant %s failed", variant)
                failed_variants[variant] = f"{type(exc).__name__}: {exc}"[:500]
            _save_partial(args, runs, head)
        base = runs[0]["triplets_per_s"] or float("nan")
        for r in runs:
            r["ratio_to_reference"] = round(r["triplets_per_s"] / base, 3)
            r["mfu"] = round(r["triplets_per_s"] * flop / peak, 5)
        return {
            "device": torch.cuda.get_device_name(0) if _cuda() and not args.tiny else "cpu",
            "tiny": args.tiny, "images": args.images, "resolution": args.resolution, "steps": args.steps, **head,
            "matmul_peak_dtype": peak_dtype,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "runs": runs,
            "batch_choice": batch_choice(runs, proj_cfg.batch_size),
            "seconds": round(time.perf_counter() - t_start, 1), "failed_variants": failed_variants,
            "skipped_variants": skipped,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _save_partial(args: argparse.Namespace, runs: list[dict], head: dict) -> None:
    """The runs so far (``"partial": true``), so a suite stopped by a time limit still leaves its measurements."""
    if args.out:
        Path(args.out).write_text(json.dumps({"partial": True, **head, "runs": runs}, indent=1, default=float))


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
                   help="batchN, two-workers and " + ", ".join(VARIANTS) + "; '+' combines (batch16+channels-last)")
    p.add_argument("--budget-s", type=float, default=420.0, help="variants are skipped past this many seconds")
    p.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "cnc-bench-models"),
                   help="where the random real-size models are written once (~9 GB, reused)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every run (0: torch's default)")
    p.add_argument("--writer", action="store_true", help="only the writer: encode ms/sample at --resolution with "
                                                          "1, 2 and 4 encode threads")
    p.add_argument("--flops", action="store_true", help="only the FLOP table of the published architectures at "
                                                         "--resolution / --steps (meta device: no GPU, no weights)")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.flops:
        from cnc.config import load_config
        from triplets.config import BuildConfig
        from triplets.flops import published_models, triplet_flops

        cfg = load_config(BuildConfig, REPO / "configs" / "build" / "default.yaml",
                          [f"resolution={args.resolution}", f"inpaint.num_inference_steps={args.steps}"])
        table = triplet_flops(cfg, published_models(cfg))
        print(table.markdown())
        if args.out:
            Path(args.out).write_text(json.dumps(table.as_dict(), indent=1))
        return table.as_dict()
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

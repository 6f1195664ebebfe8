"""CPU/GPU pools (``ray.pools``): is the (simulated) GPU kept busy? One-actor design vs split pools vs Ray Data.

This machine has no GPU, so the benchmark declares ``--gpus`` simulated GPUs to a private local Ray
(``ray.init(num_gpus=N)`` on a GPU-less machine: a resource Ray schedules like a GPU; the actors still compute on the
CPU) and adds an artificial per-batch model delay (fault injection ``model_delay_s``: a sleep after the model stages
of every batch, where they run, standing for GPU time). Tiny models keep the real model stages cheap.

Runs on the same input, config and batches:

* **single** (``ray.pools: single``, today's design): one worker per simulated GPU fetches, decodes, runs the models,
  encodes and writes (prefetch and writer threads overlap with the models);
* **split** (``ray.pools: split``): one model worker per simulated GPU runs only the models; CPU workers (the CPUs
  left) fetch, decode, encode, write and commit; batches travel as object refs;
* **ray-data** (``--ray-data``): the same three steps as a Ray Data pipeline (``map_batches`` decode tasks → a
  ``map_batches`` actor pool with one actor per simulated GPU → ``map_batches`` encode tasks), consumed without
  committing shards (it has no per-shard exactly-once commit; this measures the pipeline only).

Reported per run: triplets/s over the window (first shard start → last commit; model loading excluded) and the GPU
busy fraction = model seconds (real model stages + the simulated delay, as the model actors measured them) /
(simulated GPUs × window). Inputs: ``--input photos`` (synthetic 1024x768 JPEGs on local disk: decode-heavy) or
``--input web`` (the same photos behind the latency server of benchmarks/fetch_throughput.py, with hanging URLs).
The tars of single and split are compared (byte-identical expected)::

    .venv/bin/python benchmarks/pool_throughput.py --gpus 1 --model-delay-s 0.3            # ≈ 3 min on 2 CPUs
    .venv/bin/python benchmarks/pool_throughput.py --input web --hang 0.02 --gpus 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("pool_throughput")
MODEL_STAGES = ("segment", "inpaint", "depth", "embed", "quality", "latents", "simulated_model")


def photos(root: Path, n: int) -> Path:
    from PIL import Image

    from cnc.tiny import synthetic_photo

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(synthetic_photo(i, 768, 1024)).save(root / f"img_{i:04d}.jpg", quality=90)
    return root


def web_table(root: Path, n: int, base: str, hang: float, seed: int) -> Path:
    from fetch_throughput import make_urls

    table = root / "urls.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    with open(table, "w") as f:
        for key, url in make_urls(base, n, hang, 0.0, seed):
            f.write(json.dumps({"key": key, "url": url, "caption": f"photo {key}"}) + "\n")
    return table


def build(cfg, src: Path, out: Path, delay: float) -> dict:
    from pipelines.build import run_build

    result = run_build(cfg, str(src), out, progress=False, fault_injection={"model_delay_s": delay})
    markers = [json.loads(p.read_text()) for p in sorted(out.glob("_cnc/*_stats.json"))]
    window = max(m["finished_at"] for m in markers) - min(m["started_at"] for m in markers)
    model_s = sum(v for m in markers for k, v in m["stage_seconds"].items() if k in MODEL_STAGES)
    return {"items": sum(m["nitems"] for m in markers), "samples": result.samples, "failures": result.failures,
            "window_s": window, "model_s": model_s,
            "stage_s": {k: round(sum(m["stage_seconds"].get(k, 0) for m in markers), 2)
                        for k in ("fetch", "decode", *MODEL_STAGES, "encode", "write")}}


def ray_data_run(cfg, src: Path, gpus: int, delay: float) -> dict:
    """decode (tasks) → models (actor pool, one per simulated GPU) → encode (tasks), as Ray Data."""
    import numpy as np
    import ray

    from triplets.builder import TripletBuilder, resolve_models
    from triplets.readers import read_items

    items = read_items(str(src))
    resolved = resolve_models(cfg)
    cfg_json = cfg.model_dump(mode="json")
    bs = cfg.batch_size

    def rows_to_batch(batch: dict) -> dict:
        return {k: list(v) if getattr(v, "dtype", None) is not None and v.dtype.kind == "O" else v
                for k, v in batch.items()}

    class Decode:
        def __init__(self):
            from triplets.config import BuildConfig

            self.builder = TripletBuilder(BuildConfig.model_validate(cfg_json), resolved, load_models=False)

        def __call__(self, batch: dict) -> dict:
            t0 = time.time()
            n = len(batch["key"])
            its = [{k: batch[k][i] for k in ("key", "source", "caption")} | {"mask_path": None, "mask_kind": None}
                   for i in range(n)]
            out = self.builder.decode(its)
            out["t_start"] = np.full(n, t0)
            return {k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in out.items()}

    class Models:
        def __init__(self):
            from pipelines.pools import ModelWorker

            self.worker = ModelWorker(cfg_json, resolved, 1, {"model_delay_s": delay})

        def __call__(self, batch: dict) -> dict:
            n, t0 = len(batch["key"]), time.time()
            out, seconds = self.worker.run_models(rows_to_batch(batch))
            out["t_model"] = np.full(n, t0)
            out = {k: np.asarray([json.dumps(q) for q in v]) if k == "quality" else np.asarray(v)
                   for k, v in out.items()}
            out["model_s"] = np.full(n, sum(v for k, v in seconds.items() if k in MODEL_STAGES) / n)
            return out

    class Encode:
        def __init__(self):
            from triplets.config import BuildConfig

            self.builder = TripletBuilder(BuildConfig.model_validate(cfg_json), resolved, load_models=False)

        def __call__(self, batch: dict) -> dict:
            from triplets.sample import encode_sample

            n = len(batch["key"])
            b = rows_to_batch(batch)
            if "quality" in b:
                b["quality"] = [json.loads(q) for q in b["quality"]]
            samples, _ = self.builder.assemble(b)
            size = sum(len(v) for s in samples for k, v in encode_sample(s, cfg.jpeg_quality).items()
                       if k != "__key__")
            return {"bytes": np.full(n, size / n), "model_s": batch["model_s"], "t_model": batch["t_model"],
                    "t_end": np.full(n, time.time()), "failed": np.asarray([bool(e) for e in batch["error"]])}

    ds = ray.data.from_items([{"key": it["key"], "source": it["source"], "caption": it["caption"]} for it in items])
    ds = ds.map_batches(Decode, batch_size=bs, concurrency=1, num_cpus=0.5)
    ds = ds.map_batches(Models, batch_size=bs, concurrency=gpus, num_gpus=1, num_cpus=0.5)
    ds = ds.map_batches(Encode, batch_size=bs, concurrency=1, num_cpus=0.5)
    rows = ds.take_all()
    window = max(r["t_end"] for r in rows) - min(r["t_model"] for r in rows)  # from the first model call (loaded)
    return {"items": len(rows), "samples": sum(not r["failed"] for r in rows),
            "failures": sum(bool(r["failed"]) for r in rows), "window_s": window,
            "model_s": sum(r["model_s"] for r in rows), "stage_s": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", choices=["photos", "web"], default="photos")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--gpus", type=int, default=1, help="simulated GPUs declared to Ray")
    p.add_argument("--cpus", type=int, default=2, help="CPUs declared to Ray")
    p.add_argument("--model-delay-s", type=float, default=0.3, help="simulated GPU seconds per batch")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=1, help="inpainting steps of the tiny model")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--cpu-workers", type=int, default=0, help="split: ray.cpu_workers (0 = the CPUs left)")
    p.add_argument("--model-cpus", type=float, default=0.5, help="ray.cpus_per_worker of single workers and model "
                                                                  "workers")
    p.add_argument("--hang", type=float, default=0.02, help="web: fraction of hanging URLs")
    p.add_argument("--latency-ms", type=float, default=100)
    p.add_argument("--jitter-ms", type=float, default=50)
    p.add_argument("--deadline-s", type=float, default=4)
    p.add_argument("--ray-data", action="store_true", help="also run the Ray Data pipeline")
    p.add_argument("--designs", nargs="+", default=["single", "split"])
    p.add_argument("--set", action="append", default=[], help="extra config overrides (a.b=value), every design")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as benchmarks/build_throughput.py: no nice-15 workers

    from build_throughput import cpu_scaling, machine

    from cnc.config import load_config
    from cnc.ray_session import init_local_ray
    from triplets.config import BuildConfig

    work = Path(tempfile.mkdtemp(prefix="cnc-pools-"))
    server = None
    results: dict = {"machine": machine(), "args": vars(args), "runs": {}}
    try:
        src = photos(work / "photos", args.images if args.input == "photos" else 16)
        overrides = [f"resolution={args.resolution}", "min_side=64", f"inpaint.num_inference_steps={args.steps}",
                     f"samples_per_shard={args.samples_per_shard}", f"batch_size={args.batch_size}",
                     "max_failure_fraction=1", f"ray.cpus_per_worker={args.model_cpus}", "ray.torch_threads=1",
                     f"fetch.deadline_s={args.deadline_s}", "fetch.read_timeout_s=2", "fetch.retries=0",
                     f"ray.cpu_workers={args.cpu_workers}", "ray.cpus_per_cpu_worker=0.5", *args.set]
        if args.input == "web":
            from fetch_throughput import start_server

            server, base = start_server(argparse.Namespace(latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
                                                           seed=args.seed))
            src = web_table(work / "table", args.images, base, args.hang, args.seed)
        results["contention_probe_before"] = cpu_scaling()
        init_local_ray(num_cpus=args.cpus, num_gpus=args.gpus, object_store_memory=300 * 2**20)
        for design in args.designs:
            cfg = load_config(BuildConfig, "configs/build/tiny.yaml", overrides + [f"ray.pools={design}"])
            out = work / design
            t0 = time.perf_counter()
            r = build(cfg, src, out, args.model_delay_s)
            r["e2e_s"] = time.perf_counter() - t0
            results["runs"][design] = r
            log.info("%s: %s", design, r)
        if args.ray_data:
            cfg = load_config(BuildConfig, "configs/build/tiny.yaml", overrides)
            try:
                results["runs"]["ray-data"] = ray_data_run(cfg, src, args.gpus, args.model_delay_s)
            except Exception as exc:  # noqa: BLE001 - report why instead of losing the other runs
                results["runs"]["ray-data"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log.info("ray-data: %s", results["runs"]["ray-data"])
        if {"single", "split"} <= set(args.designs):
            from triplets.shardio import file_sha256

            shas = {d: {q.name: file_sha256(q) for q in sorted((work / d).glob("*.tar"))} for d in ("single", "split")}
            results["byte_identical"] = shas["single"] == shas["split"]
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    results["contention_probe_after"] = cpu_scaling()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nmachine: {results['machine']}; contention probe {results['contention_probe_before']:.2f} before, "
          f"{results['contention_probe_after']:.2f} after (2.0 = idle)")
    print(f"input {args.input}, {args.images} images, {args.gpus} simulated GPU(s), {args.cpus} Ray CPUs, "
          f"model delay {args.model_delay_s:g} s/batch of {args.batch_size}, {args.resolution} px, "
          f"{args.steps} inpainting step(s)")
    print("| design | samples + failures | triplets/s | ratio | GPU busy | model s | window s |\n"
          "|---|---|---|---|---|---|---|")
    base = results["runs"].get("single")
    for name, r in results["runs"].items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        rate = r["samples"] / r["window_s"]
        ratio = rate / (base["samples"] / base["window_s"]) if base else float("nan")
        busy = r["model_s"] / (args.gpus * r["window_s"])
        print(f"| {name} | {r['samples']} + {r['failures']} | {rate:.2f} | {ratio:.2f} | {busy:.0%} | "
              f"{r['model_s']:.1f} | {r['window_s']:.1f} |")
    if "byte_identical" in results:
        print(f"single and split tars byte-identical: {results['byte_identical']}")


if __name__ == "__main__":
    main()

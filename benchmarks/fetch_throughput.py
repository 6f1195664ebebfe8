"""Web-URL fetching per worker: ``triplets.fetch`` (concurrent, deadlines) vs today's sequential read.

A local HTTP server (aiohttp, in its own process, 127.0.0.1 only) answers every request after ``--latency-ms`` ±
``--jitter-ms`` (uniform); a fraction of the URLs hang (the connection is accepted, nothing is ever sent) and a
fraction fail (half 503 for ever — retried, then quarantined —, half 404). Images are synthetic 640x480 JPEGs.

Runs, each in this one process (what one shard worker does: its fetch stream, then decode + resize to
``--resolution`` in one thread, batch by batch, with the project's load stage):

* **sequential (before)**: one URL at a time through fsspec's HTTP filesystem (``resolve(url).read_bytes()``, the read
  path before issue 27), on the healthy URLs only (a hanging URL never returns there: no timeout);
* **fetch, healthy**: the same URLs through :class:`triplets.fetch.Fetcher` (``fetch.*`` as configured below);
* **fetch, mixed**: all URLs (hanging and failing included), split into shards of ``--shard-size``, each shard
  run twice: as is, and as a control where its hanging URLs answer like the others; reports the per-shard wall time
  (p50, p99, max) and each shard's excess over its control, to compare with one ``fetch.deadline_s``.

Goals (issue 27): >= 50 images/s per worker at 100 ms latency; a shard with hanging URLs finishing within one deadline
of the others::

    .venv/bin/python benchmarks/fetch_throughput.py                       # ≈ 2 min on 2 CPUs
    .venv/bin/python benchmarks/fetch_throughput.py --images 400 --shard-size 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("fetch_throughput")


# -- the server (a subprocess) -------------------------------------------------------------------------------
def serve(port_file: str, latency_ms: float, jitter_ms: float, images: int, seed: int) -> None:
    """aiohttp server: ``/ok/N.jpg`` (image N mod ``images`` after the latency), ``/hang/N.jpg`` (never answers),
    ``/e503/N.jpg`` and ``/e404/N.jpg`` (after the latency)."""
    import asyncio
    import io

    from aiohttp import web
    from PIL import Image

    from cnc.tiny import synthetic_photo

    bodies = []
    for i in range(images):
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(seed + i, 480, 640)).save(buf, format="JPEG", quality=90)
        bodies.append(buf.getvalue())
    rng = random.Random(seed)

    async def handle(request: web.Request) -> web.Response:
        kind, name = request.match_info["kind"], request.match_info["name"]
        if kind == "hang":
            await asyncio.sleep(3600)
        await asyncio.sleep(max(0.0, latency_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000)
        if kind == "ok":
            return web.Response(body=bodies[int(name.split(".")[0]) % len(bodies)], content_type="image/jpeg")
        return web.Response(status=int(kind[1:]))

    app = web.Application()
    app.router.add_get("/{kind}/{name}", handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)  # listening before the port is published
    Path(port_file).write_text(str(sock.getsockname()[1]))
    web.run_app(app, sock=sock, print=None, access_log=None, backlog=1024, shutdown_timeout=1)


def start_server(args) -> tuple[subprocess.Popen, str]:
    port_file = Path(tempfile.mkdtemp(prefix="fetch-bench-")) / "port"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), "--latency-ms", str(args.latency_ms),
                             "--jitter-ms", str(args.jitter_ms), "--seed", str(args.seed)])
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the benchmark server did not start")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


# -- URL sets ------------------------------------------------------------------------------------------------
def make_urls(base: str, n: int, hang: float, fail: float, seed: int) -> list[tuple[str, str]]:
    """``(key, url)`` × n; ``hang`` and ``fail`` fractions of them hanging / failing, at random positions."""
    rng = random.Random(seed)
    kinds = ["hang"] * round(n * hang) + ["e503", "e404"] * (round(n * fail) // 2)
    kinds += ["ok"] * (n - len(kinds))
    rng.shuffle(kinds)
    return [(f"k{i:06d}", f"{base}/{kind}/{i}.jpg") for i, kind in enumerate(kinds)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))  # ceil(q/100 × n)
    return ordered[rank - 1]


# -- the runs ------------------------------------------------------------------------------------------------
def shard_pass(stage, fetcher, items: list[dict], batch_size: int) -> dict:
    """One shard the way a worker does it: its fetch stream, decoded batch by batch; counts by outcome."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    stream = fetcher.map_items(items) if fetcher is not None else None
    ok = failed = 0
    reasons: dict[str, int] = {}
    for lo in range(0, len(items), batch_size):
        chunk = items[lo:lo + batch_size]
        rows = {k: [it.get(k) for it in chunk] for k in ("key", "source", "caption", "mask_path", "mask_kind")}
        if stream is not None:
            rows["fetched"] = [next(stream) for _ in chunk]
        from triplets.batch import ensure_status

        batch = stage(ensure_status(rows))
        for err, st in zip(batch["error"], batch["error_stage"]):
            if err:
                failed += 1
                reason = f"{st}: {err.split(' (')[0][:60]}"
                reasons[reason] = reasons.get(reason, 0) + 1
            else:
                ok += 1
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "ok": ok, "failed": failed,
            "reasons": reasons}


def sequential_stage(resolution: int):
    """The load stage as it read sources before issue 27: one at a time, fsspec HTTP, no timeout."""
    from cnc.base.location import resolve
    from triplets.fetch import Fetched
    from triplets.stages.load import LoadStage

    class Sequential(LoadStage):
        def process(self, rows: dict):
            fetched = []
            for src in rows["source"]:
                try:
                    fetched.append((Fetched(resolve(src).read_bytes()), None))
                except Exception as exc:  # noqa: BLE001 - fsspec raises many kinds
                    fetched.append((Fetched(None, f"{type(exc).__name__}"), None))
            return super().process({**rows, "fetched": fetched})

    return Sequential(resolution, 64)


def run(args) -> dict:
    from build_throughput import cpu_scaling, machine

    from triplets.fetch import Fetcher
    from triplets.stages.load import LoadStage

    probe_before = cpu_scaling()
    server, base = start_server(args)
    fetch_cfg = {"concurrency": args.concurrency, "connect_timeout_s": args.connect_timeout_s,
                 "read_timeout_s": args.read_timeout_s, "deadline_s": args.deadline_s, "retries": args.retries,
                 "backoff_s": args.backoff_s}
    results: dict = {"machine": machine(), "args": vars(args), "fetch": fetch_cfg}
    try:
        healthy = [{"key": k, "source": u} for k, u in make_urls(base, args.healthy_images, 0, 0, args.seed)]
        stage = LoadStage(args.resolution, 64, fetch=fetch_cfg, decode_threads=args.decode_threads)
        fetcher = Fetcher(fetch_cfg)
        shard_pass(stage, fetcher, healthy[:32], args.batch_size)  # warm-up: session, DNS, decoder

        t0, cpu0 = time.perf_counter(), time.process_time()
        nbytes = sum(len(got.data) for got, _ in fetcher.map_items(healthy))
        dt = time.perf_counter() - t0
        results["fetch_only"] = {"images": len(healthy), "seconds": dt, "images_per_s": len(healthy) / dt,
                                 "mb_per_s": nbytes / dt / 1e6, "cpu_s": time.process_time() - cpu0, "ok": len(healthy)}
        log.info("fetch only (no decode), healthy: %d images in %.1f s = %.1f images/s", len(healthy), dt,
                 len(healthy) / dt)

        seq = healthy[:args.sequential_images]
        r = shard_pass(sequential_stage(args.resolution), None, seq, args.batch_size)
        results["sequential"] = {"images": len(seq), **r, "images_per_s": r["ok"] / r["seconds"]}
        log.info("sequential (before): %d images in %.1f s = %.1f images/s", r["ok"], r["seconds"],
                 r["ok"] / r["seconds"])

        r = shard_pass(stage, fetcher, healthy, args.batch_size)
        results["fetch_healthy"] = {"images": len(healthy), **r, "images_per_s": r["ok"] / r["seconds"]}
        log.info("fetch, healthy: %d images in %.1f s = %.1f images/s", r["ok"], r["seconds"], r["ok"] / r["seconds"])

        mixed = [{"key": k, "source": u} for k, u in make_urls(base, args.images, args.hang, args.fail, args.seed)]
        control = [{**it, "source": it["source"].replace("/hang/", "/ok/")} for it in mixed]
        per_shard, total = [], 0.0
        for lo in range(0, len(mixed), args.shard_size):
            with_hang = shard_pass(stage, fetcher, mixed[lo:lo + args.shard_size], args.batch_size)
            without = shard_pass(stage, fetcher, control[lo:lo + args.shard_size], args.batch_size)
            with_hang["hanging"] = sum("/hang/" in it["source"] for it in mixed[lo:lo + args.shard_size])
            with_hang["control_seconds"] = without["seconds"]
            per_shard.append(with_hang)
            total += with_hang["seconds"]
            log.info("shard %d: %d items, %d hanging: %.2f s (%.2f s with those URLs answering)", len(per_shard) - 1,
                     len(mixed[lo:lo + args.shard_size]), with_hang["hanging"], with_hang["seconds"],
                     without["seconds"])
        fetcher.close()
        reasons: dict[str, int] = {}
        for sh in per_shard:
            for k, v in sh["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        secs = [sh["seconds"] for sh in per_shard]
        results["fetch_mixed"] = {
            "images": len(mixed), "shards": len(per_shard), "seconds": total,
            "ok": sum(sh["ok"] for sh in per_shard), "failed": sum(sh["failed"] for sh in per_shard),
            "images_per_s": sum(sh["ok"] for sh in per_shard) / total, "reasons": reasons,
            "cpu_s": sum(sh["cpu_s"] for sh in per_shard),
            "shard_s": {"p50": percentile(secs, 50), "p99": percentile(secs, 99), "max": max(secs)},
            "control_shard_s": {"p50": percentile([sh["control_seconds"] for sh in per_shard], 50),
                                "max": max(sh["control_seconds"] for sh in per_shard)},
            "hanging_per_shard": [sh["hanging"] for sh in per_shard],
            "excess_s": [sh["seconds"] - sh["control_seconds"] for sh in per_shard],
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    results["contention_probe"] = {"before": probe_before, "after": cpu_scaling()}
    return results


def report(res: dict) -> None:
    seq, healthy, mixed = res["sequential"], res["fetch_healthy"], res["fetch_mixed"]
    a = res["args"]
    print(f"machine: {res['machine']}; contention probe {res['contention_probe']['before']:.2f} before, "
          f"{res['contention_probe']['after']:.2f} after (2.0 = idle)")
    print(f"latency {a['latency_ms']:g} ± {a['jitter_ms']:g} ms, decode + resize to {a['resolution']} px "
          f"({a['decode_threads']} decode thread(s)), "
          f"fetch: {json.dumps(res['fetch'])}")
    only = res["fetch_only"]

    def cpu_ms(r: dict) -> str:
        return f"{1000 * r['cpu_s'] / max(1, r['ok']):.1f}"

    print(f"| run | images | images/s per worker | ratio | CPU ms per image |\n|---|---|---|---|---|\n"
          f"| sequential fsspec read (before), healthy URLs | {seq['ok']} | {seq['images_per_s']:.1f} | 1.00 | "
          f"{cpu_ms(seq)} |\n"
          f"| triplets.fetch, healthy URLs, fetch only (no decode) | {only['images']} | {only['images_per_s']:.1f} | "
          f"{only['images_per_s'] / seq['images_per_s']:.1f} | {cpu_ms(only)} |\n"
          f"| triplets.fetch, healthy URLs | {healthy['ok']} | {healthy['images_per_s']:.1f} | "
          f"**{healthy['images_per_s'] / seq['images_per_s']:.1f}** | {cpu_ms(healthy)} |\n"
          f"| triplets.fetch, mixed ({a['hang']:.0%} hanging, {a['fail']:.0%} failing), {mixed['shards']} shards | "
          f"{mixed['ok']} ok + {mixed['failed']} quarantined | {mixed['images_per_s']:.1f} | "
          f"{mixed['images_per_s'] / seq['images_per_s']:.1f} | {1000 * mixed['cpu_s'] / max(1, mixed['ok']):.1f} |")
    print(f"CPU capacity: {1000 / float(cpu_ms(healthy)):.0f} images per CPU-second fetched + decoded "
          f"(what one idle core sustains; the wall-clock rates above depend on the other load)")
    print(f"shard seconds ({a['shard_size']} items, hanging URLs per shard {mixed['hanging_per_shard']}): "
          f"p50 {mixed['shard_s']['p50']:.2f}, p99 {mixed['shard_s']['p99']:.2f}, max {mixed['shard_s']['max']:.2f}; "
          f"the same shards with those URLs answering: p50 {mixed['control_shard_s']['p50']:.2f}, max "
          f"{mixed['control_shard_s']['max']:.2f}")
    deadline = res["fetch"]["deadline_s"]
    excess = max(mixed["excess_s"])
    print(f"worst shard excess over its control = {excess:.2f} s "
          f"({'within' if excess <= deadline else 'OVER'} one deadline of {deadline:g} s)")
    print(f"goal >= 50 images/s per worker: {'met' if healthy['images_per_s'] >= 50 else 'NOT met'} "
          f"({healthy['images_per_s']:.1f} healthy, {mixed['images_per_s']:.1f} mixed)")
    print("quarantined by reason:", json.dumps(mixed["reasons"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=600, help="URLs of the mixed run")
    p.add_argument("--healthy-images", type=int, default=400, help="URLs of the healthy run")
    p.add_argument("--sequential-images", type=int, default=60, help="URLs of the sequential run")
    p.add_argument("--shard-size", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--latency-ms", type=float, default=100)
    p.add_argument("--jitter-ms", type=float, default=50)
    p.add_argument("--hang", type=float, default=0.01, help="fraction of URLs that never answer")
    p.add_argument("--fail", type=float, default=0.02, help="fraction of URLs that fail (half 503, half 404)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--decode-threads", type=int, default=2, help="ray.decode_threads")
    p.add_argument("--connect-timeout-s", type=float, default=5)
    p.add_argument("--read-timeout-s", type=float, default=3)
    p.add_argument("--deadline-s", type=float, default=8)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--backoff-s", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.latency_ms, args.jitter_ms, 16, args.seed)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("CNC_LOG_LEVEL", "WARNING")
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    report(res)


if __name__ == "__main__":
    main()

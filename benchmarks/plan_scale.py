"""Planning at scale: plan time, plan size and driver peak memory for a synthetic table input of N rows.

::

    .venv/bin/python benchmarks/plan_scale.py --rows 1000000 10000000 --rows-per-file 100000

For each N the script writes a synthetic img2dataset-style parquet input (``url``, ``caption``, ``key`` columns;
``--rows-per-file`` rows per file; no images: planning never reads them), then runs ``cnc build --plan-only`` (the
code path of every build: model resolution, input metadata, plan, ``plan.json`` written under the output lock) in a
fresh process and reports:

* *plan s*: wall time of :func:`pipelines.build.run_plan_only` (model resolution of the tiny config included);
* *plan MB*: size of ``plan.json``;
* *peak RSS MB*: the planning process's peak resident memory (``ru_maxrss``), and *base RSS MB*, its resident
  memory after imports and before planning: the difference is what planning costs.

It then extrapolates linearly to ``--extrapolate`` rows (default 100M) through the two largest runs (so fixed costs
such as imports do not scale), or proportionally from a single run. Goal: 100M rows
planned in ≤ 2 minutes with a driver under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("plan_scale")
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "build" / "tiny.yaml"


def write_table(folder: Path, rows: int, rows_per_file: int) -> int:
    """Write ``rows`` synthetic rows as parquet files of ``rows_per_file``; returns the number of files."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    nfiles = 0
    for start in range(0, rows, rows_per_file):
        ids = pc.cast(pa.array(range(start, min(rows, start + rows_per_file))), pa.string())
        keys = pc.utf8_lpad(ids, 9, "0")
        pq.write_table(pa.table({
            "url": pc.binary_join_element_wise("https://images.example.com/", keys, ".jpg", ""),
            "caption": pc.binary_join_element_wise("a synthetic caption number ", ids, ""),
            "key": keys,
        }), folder / f"{nfiles:05d}.parquet")
        nfiles += 1
    return nfiles


def child(input: str, output: str) -> None:
    """Run one plan in this process and print its measurements as JSON."""
    import resource

    from cnc.config import load_config
    from pipelines.build import run_plan_only
    from triplets.builder import resolve_models
    from triplets.config import BuildConfig

    cfg = load_config(BuildConfig, str(TINY), ["device=cpu"])
    resolve_models(cfg)  # imports and tiny checkpoints in place before the base measurement
    base = _rss_mb()
    t = time.perf_counter()
    info = run_plan_only(cfg, input, output)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "plan_bytes": info["plan_bytes"], "items": info["items"],
                      "shards": info["shards"], "files": info["input_files"], "peak_rss_mb": peak,
                      "base_rss_mb": base}))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--rows-per-file", type=int, default=100_000)
    ap.add_argument("--extrapolate", type=int, default=100_000_000)
    ap.add_argument("--workdir", default=None, help="where the synthetic tables go (default: a temporary folder)")
    ap.add_argument("--child", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        child(*args.child)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.rows:
            src, out = Path(tmp) / f"table-{n}", Path(tmp) / f"out-{n}"
            t = time.perf_counter()
            nfiles = write_table(src, n, args.rows_per_file)
            log.info("wrote %d rows in %d files (%.1f s)", n, nfiles, time.perf_counter() - t)
            proc = subprocess.run([sys.executable, __file__, "--child", str(src), str(out)], cwd=REPO,
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"plan of {n} rows failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            log.info("%d rows, %d files, %d shards: plan %.2f s, plan.json %.2f MB, peak RSS %.0f MB (base %.0f MB)",
                     r["items"], r["files"], r["shards"], r["seconds"], r["plan_bytes"] / 2**20, r["peak_rss_mb"],
                     r["base_rss_mb"])
    print("| rows | files | shards | plan s | plan.json MB | peak RSS MB | planning RSS MB (peak − base) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['items']:,} | {r['files']} | {r['shards']:,} | {r['seconds']:.2f} | {r['plan_bytes'] / 2**20:.2f} "
              f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['base_rss_mb']:.0f} |")
    # linear fit through the two largest runs (fixed costs cancel); proportional with one run
    pts = sorted(results, key=lambda r: r["items"])[-2:]
    n = args.extrapolate

    def fit(key: str) -> float:
        if len(pts) == 1:
            return pts[0][key] * n / pts[0]["items"]
        (a, b), (na, nb) = (pts[0][key], pts[1][key]), (pts[0]["items"], pts[1]["items"])
        return b + (b - a) / (nb - na) * (n - nb)

    print(f"| {n:,} (extrapolated) | {fit('files'):.0f} | {fit('shards'):,.0f} | {fit('seconds'):.1f} "
          f"| {fit('plan_bytes') / 2**20:.1f} | {fit('peak_rss_mb'):.0f} "
          f"| {fit('peak_rss_mb') - pts[-1]['base_rss_mb']:.0f} |")

if __name__ == "__main__":
    main()

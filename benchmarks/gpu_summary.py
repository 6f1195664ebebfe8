"""One summary of a ``benchmarks/gpu_check.sh`` run: ``OUT/summary.json`` and ``OUT/summary.md`` from the phase files.

    python benchmarks/gpu_summary.py OUT

Reads whatever phase files exist (``env.json``, ``gpu_suite.json``, ``train.json``, ``micro.json``, ``loader.json``,
``smi.csv`` + ``phases.csv``), partial ones included, so it can run after every phase. The markdown is the table
docs/benchmarks.md takes: the build runs (triplets/s, ratio to the reference setting, MFU, peak memory, per-stage
GPU ms), the batch-size choice, the counted FLOP table, the trainer rows, the micro-benchmarks, and the goals of
issue 29 checked against the numbers.
"""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime
from pathlib import Path

#: Issue 29's goals: build ≥ 8× the reference setting and ≥ 40 % MFU; trainer ≥ 5× the reference's images/s at
#: ≤ 60 % of its memory.
BUILD_RATIO, BUILD_MFU, TRAIN_RATIO, TRAIN_MEMORY = 8.0, 0.40, 5.0, 0.60
STAGES = ("segment", "inpaint", "depth", "embed", "quality")


def _load(out: Path, name: str):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def summarise(out: Path) -> dict:
    s: dict = {"written": datetime.now().isoformat(timespec="seconds")}
    env = _load(out, "env.json")
    if env:
        s["env"] = {k: env.get(k) for k in ("python", "gpu", "gpu_mem_gib", "cuda_version", "cpus", "required_failed")}
        s["env"]["torch"] = (env.get("modules", {}).get("torch") or {}).get("version")
    suite = _load(out, "gpu_suite.json")
    if suite:
        runs = suite.get("runs", [])
        flop, peak = suite.get("flop_per_triplet"), suite.get("matmul_peak_flops")
        base = runs[0]["triplets_per_s"] if runs else None
        s["build"] = {
            "partial": suite.get("partial", False), "device": suite.get("device"),
            "flop_per_triplet_T": flop and flop / 1e12, "matmul_peak_T": peak and peak / 1e12,
            "flops": suite.get("flops"), "batch_choice": suite.get("batch_choice"),
            "failed_variants": suite.get("failed_variants"), "skipped_variants": suite.get("skipped_variants"),
            "same_work_in_every_run": len({json.dumps(r.get("stage_rows"), sort_keys=True) for r in runs}) <= 1,
            "runs": [{"run": r["run"], "triplets_per_s": round(r["triplets_per_s"], 4),
                      "ratio": round(r["triplets_per_s"] / base, 3) if base else None,
                      "mfu": round(r["triplets_per_s"] * flop / peak, 4) if flop and peak else None,
                      "peak_gib": r.get("peak_gib"), "gpu_ms_per_item": r.get("gpu_ms_per_item"),
                      "cpu_ms_per_item": r.get("cpu_ms_per_item"), "load_s": r.get("load_s"),
                      "warmup_s": r.get("warmup_s")} for r in runs]}
    train = _load(out, "train.json")
    if train:
        ref = next((r for r in train if r["setting"] == "reference"), None)
        s["train"] = [{"setting": r["setting"], "dtype": r["dtype"], "batch": r["batch"],
                       "checkpointing": r.get("gradient_checkpointing"), "fused_adamw": r.get("fused_adamw"),
                       "checkpointing_reason": r.get("checkpointing_reason"), "step_s": round(r["step_s"], 4),
                       "images_per_s": round(r["images_per_s"], 3), "tflops": r.get("tflops"),
                       "peak_gb": round(r["peak_gb"], 2),
                       "vs_reference": round(r["images_per_s"] / ref["images_per_s"], 2) if ref else None,
                       "memory_vs_reference": round(r["peak_gb"] / ref["peak_gb"], 2) if ref else None}
                      for r in train]
    micro = _load(out, "micro.json")
    if micro:
        s["micro"] = micro
    loader = _load(out, "loader.json")
    if loader:
        s["loader"] = loader
    s["gpu_util_by_phase"] = _gpu_util(out)
    s["goals"] = _goals(s)
    return s


def _gpu_util(out: Path) -> dict:
    """Mean GPU utilisation and power per phase, from the nvidia-smi samples."""
    try:
        spans, opened = {}, {}
        for ts, name, what in (ln.strip().split(",", 2) for ln in open(out / "phases.csv")):
            if what == "start":
                opened[name] = float(ts)
            elif what.startswith("end") and name in opened:
                spans[name] = (opened.pop(name), float(ts))
        util: dict = {k: [] for k in spans}
        for row in csv.reader(open(out / "smi.csv")):
            try:
                t = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                sample = (float(row[1]), float(row[3]))
            except (ValueError, IndexError):
                continue
            for k, (a, b) in spans.items():
                if a <= t <= b:
                    util[k].append(sample)
        return {k: {"samples": len(v), "util_pct_mean": round(sum(u for u, _ in v) / len(v), 1),
                    "power_w_mean": round(sum(p for _, p in v) / len(v), 1)} for k, v in util.items() if v}
    except OSError:
        return {}


def _goals(s: dict) -> dict:
    goals = {}
    runs = (s.get("build") or {}).get("runs") or []
    if len(runs) > 1:
        best = max(runs[1:], key=lambda r: r["triplets_per_s"])
        shipped = runs[1]
        goals["build"] = {"shipped_ratio": shipped["ratio"], "shipped_mfu": shipped["mfu"],
                          "best_run": best["run"], "best_ratio": best["ratio"], "best_mfu": best["mfu"],
                          "goal": f">= {BUILD_RATIO:g}x the reference setting and >= {BUILD_MFU:.0%} MFU",
                          "met_by_shipped": bool(shipped["ratio"] and shipped["mfu"] and shipped["ratio"] >= BUILD_RATIO
                                                 and shipped["mfu"] >= BUILD_MFU)}
    train = s.get("train") or []
    project = next((r for r in train if r["setting"] == "project"), None)
    if project and project.get("vs_reference"):
        goals["train"] = {"shipped_vs_reference": project["vs_reference"],
                          "memory_vs_reference": project["memory_vs_reference"],
                          "goal": f">= {TRAIN_RATIO:g}x images/s at <= {TRAIN_MEMORY:.0%} of the reference's memory",
                          "met": project["vs_reference"] >= TRAIN_RATIO
                          and project["memory_vs_reference"] <= TRAIN_MEMORY}
    return goals


def _f(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(s: dict) -> str:
    env = s.get("env") or {}
    lines = [f"# gpu_check summary ({s['written']})", "",
             f"GPU: {env.get('gpu', '-')} ({_f(env.get('gpu_mem_gib'))} GiB), torch {env.get('torch', '-')}, "
             f"CUDA {env.get('cuda_version', '-')}, Python {env.get('python', '-')}, {env.get('cpus', '-')} CPUs", ""]
    build = s.get("build")
    if build:
        state = "partial" if build["partial"] else "complete"
        lines += [f"## Build ({state}; {_f(build['flop_per_triplet_T'], '.4g')} TFLOP per triplet, counted; matmul "
                  f"peak {_f(build['matmul_peak_T'], '.4g')} TFLOP/s)", "",
                  "| run | triplets/s | × reference | MFU | peak GiB | " + " | ".join(f"{st} GPU ms" for st in STAGES)
                  + " |", "|" + "---|" * (5 + len(STAGES))]
        for r in build["runs"]:
            gpu = r.get("gpu_ms_per_item") or {}
            lines.append(f"| {r['run']} | {_f(r['triplets_per_s'], '.3f')} | {_f(r['ratio'], '.2f')} | "
                         f"{_f(r['mfu'] and 100 * r['mfu'], '.1f')} % | {_f(r['peak_gib'])} | "
                         + " | ".join(_f(gpu.get(st), '.1f') for st in STAGES) + " |")
        choice = build.get("batch_choice") or {}
        if choice:
            lines += ["", f"Batch size: best measured {choice['best']} (shipped {choice['shipped']}, "
                          f"{100 * choice['gain_over_shipped']:+.1f} %; triplets/s by batch {choice['measured']}); "
                          f"{'change the default' if choice['change_default'] else 'keep the default'}."]
        for key in ("failed_variants", "skipped_variants"):
            if build.get(key):
                lines.append(f"{key.replace('_', ' ')}: {build[key]}")
        flops = build.get("flops")
        if flops:
            lines += ["", "| stage | model | input | GFLOP per call | calls per triplet | TFLOP per triplet |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['stage']} | {r['model']} | {r['input']} | {r['flop_per_call'] / 1e9:.4g} | "
                      f"{r['calls_per_triplet']:g} | {r['flop_per_triplet'] / 1e12:.4g} |" for r in flops["rows"]]
        lines.append("")
    if s.get("train"):
        lines += ["## Trainer", "", "| setting | dtype | batch | checkpointing | fused AdamW | images/s | TFLOP/s | "
                  "peak GB | × reference speed | × reference memory |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['dtype']} | {r['batch']} | {r['checkpointing']} | {r['fused_adamw']} | "
                  f"{_f(r['images_per_s'])} | {_f(r['tflops'])} | {_f(r['peak_gb'])} | {_f(r['vs_reference'])} | "
                  f"{_f(r['memory_vs_reference'])} |" for r in s["train"]]
        auto = next((r for r in s["train"] if r["setting"] == "project"), None)
        if auto and auto.get("checkpointing_reason"):
            lines.append(f"\nShipped checkpointing decision: {auto['checkpointing_reason']}")
        lines.append("")
    micro = s.get("micro") or {}
    for section, cols in (("unet", ("run", "cfg_batch", "ms_per_eval", "tflops", "mfu")),
                          ("inpaint", ("run", "ms_per_batch", "host_syncs_per_batch")),
                          ("sam", ("run", "ms_per_batch", "ms_per_image", "tflops", "peak_gib"))):
        rows = (micro.get(section) or {}).get("runs") or []
        if rows:
            lines += [f"## Micro: {section}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
            extra = {k: v for k, v in micro[section].items() if k not in ("runs",)}
            lines += ["", f"{extra}", ""]
    if micro.get("errors"):
        lines += [f"micro errors: {micro['errors']}", ""]
    if s.get("goals"):
        lines += ["## Goals (issue 29)", "", f"```\n{json.dumps(s['goals'], indent=1)}\n```", ""]
    if s.get("gpu_util_by_phase"):
        lines += ["GPU utilisation by phase: " + json.dumps(s["gpu_util_by_phase"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    out = Path((argv or sys.argv[1:])[0])
    s = summarise(out)
    (out / "summary.json").write_text(json.dumps(s, indent=1, default=float))
    (out / "summary.md").write_text(markdown(s))
    print(markdown(s))
    return s


if __name__ == "__main__":
    main()

"""Contact-sheet caption wrapping cost vs caption length (issue 11.7: it was quadratic).

    .venv/bin/python benchmarks/caption_wrap.py                       # current code only
    .venv/bin/python benchmarks/caption_wrap.py --compare REV         # also the render.py of git revision REV

Renders a one-row contact sheet (tile 128 px) of a sample whose caption is one long word, or many words followed
by a long word, and prints seconds and the number of ``ImageDraw.textlength`` calls per caption. Each old-code run
has a time limit (``--limit``, default 60 s): quadratic wrapping does not finish for long captions.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import subprocess
import sys
import tempfile
import time

import numpy as np

CAPTIONS = {"5k-char word": "x" * 5000, "50k chars, words": "word " * 10_000, "1M chars": "y" * 1_000_000}


def _sample(caption: str):
    from triplets.sample import TripletSample

    r = 32
    mask = np.zeros((r, r), np.uint8)
    mask[8:24, 8:24] = 1
    z3, z2 = np.zeros((r, r, 3), np.uint8), np.zeros((r, r), np.uint16)
    return TripletSample("k", z3, mask, z3, z2, z2, np.ones(8, np.float32), np.ones(8, np.float32), caption, {})


def _run(render_path: str | None, caption: str, queue) -> None:
    from PIL import ImageDraw

    if render_path:
        spec = importlib.util.spec_from_file_location("render_under_test", render_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["render_under_test"] = mod
        spec.loader.exec_module(mod)
    else:
        from triplets.inspect import render as mod
    calls = [0]
    real = ImageDraw.ImageDraw.textlength

    def counted(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    ImageDraw.ImageDraw.textlength = counted
    t0 = time.perf_counter()
    try:
        mod.contact_sheet([_sample(caption)], tile=128)
        queue.put((time.perf_counter() - t0, calls[0], None))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        queue.put((time.perf_counter() - t0, calls[0], f"{type(exc).__name__}"))


def measure(render_path: str | None, caption: str, limit: float) -> str:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(render_path, caption, queue))
    proc.start()
    proc.join(limit)
    if proc.is_alive():
        proc.terminate()
        return f"> {limit:.0f} s (stopped)"
    seconds, calls, error = queue.get()
    return f"{seconds:.3f} s, {calls} calls" + (f", {error}" if error else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", help="git revision whose triplets/inspect/render.py to measure too")
    ap.add_argument("--limit", type=float, default=60.0)
    args = ap.parse_args()
    versions = {"current": None}
    if args.compare:
        old = subprocess.run(["git", "show", f"{args.compare}:triplets/inspect/render.py"], check=True,
                             capture_output=True, text=True).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(old)
        versions[args.compare] = f.name
    print("| caption | " + " | ".join(versions) + " |")
    print("|---|" + "---|" * len(versions))
    for name, caption in CAPTIONS.items():
        cells = [measure(path, caption, args.limit) for path in versions.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

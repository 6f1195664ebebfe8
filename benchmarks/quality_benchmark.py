"""How well each quality score measures what its name says: ROC-AUC and precision/recall on labelled triplets.

    .venv/bin/python benchmarks/quality_benchmark.py                          # 60 scenes at 256 px, tiny CLIP
    .venv/bin/python benchmarks/quality_benchmark.py --config configs/build/default.yaml   # real CLIP (GPU if any)

The cases (:mod:`triplets.quality_cases`) have their answer by construction: objects composited onto the
repository's example photos and procedural textures, and every I_b variant labelled (clean removal, not removed —
also JPEG re-encoded and brightened —, re-painted in place, partial, replaced, smeared, low-contrast object removed);
depth cases with synthetic disparity maps of known geometry (object nearer, standing on the ground, or farther).
The scores are the shipped code (:func:`triplets.quality.statistics`, the function builds and ``cnc score`` call),
judged at the shipped thresholds (:data:`triplets.quality.SCORES`). The model-free scores (removal, depth) give the
same numbers on any machine. ``clip_sim`` needs CLIP: it runs with ``embed.model`` of ``--config`` (the tiny config's
seeded random model measures nothing but the plumbing — the output says which model was used), or is reported as
not measured with ``--no-models``.

Prints markdown tables (for docs/build.md): per score, per variant, and a threshold sweep to choose from.
"""

from __future__ import annotations

import argparse
import json
import time

SWEEP = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=60)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="configs/build/tiny.yaml", help="build config naming embed.model (clip_sim)")
    ap.add_argument("--device", default="auto", help="auto = CUDA when present (the learned terms), else CPU")
    ap.add_argument("--no-models", action="store_true", help="model-free scores only (clip_sim not measured)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from cnc.config import load_config
    from triplets.config import BuildConfig
    from triplets.quality import SCORES, score_value
    from triplets.quality_cases import by_variant, evaluate, make_cases, roc_auc, score_cases, sweep

    cfg = load_config(BuildConfig, args.config, [f"device={args.device}"])
    scorer, used = None, "none (--no-models): clip_sim not measured"
    if not args.no_models:
        from cnc.hub import resolve_pretrained
        from triplets.quality import QualityScorer
        from triplets.stages.embed import CLIPImageEmbedder

        path = resolve_pretrained(cfg.embed.model, "embed.model", seed=cfg.seed)
        scorer = QualityScorer(CLIPImageEmbedder(path, cfg.device, cfg.dtype))
        used = f"embed.model = {cfg.embed.model} on {scorer.embedder.device}"
        if cfg.embed.model == "tiny":
            used += (" (a seeded random tiny model: its clip_sim reacts to pixel changes only — no CLIP semantics; "
                     "not a measurement of CLIP)")

    t0 = time.perf_counter()
    cases = list(make_cases(args.scenes, args.resolution, args.seed, cfg.inpaint.dilation_px))
    t1 = time.perf_counter()
    qualities = score_cases(cases, scorer, cfg.inpaint.dilation_px, cfg.quality.change_floor)
    t2 = time.perf_counter()
    results = evaluate(cases, qualities)
    n_removal = sum(c.task == "removal" for c in cases)
    print(f"{args.scenes} scenes at {args.resolution} px (seed {args.seed}): {n_removal} removal cases, "
          f"{len(cases) - n_removal} depth cases; made in {t1 - t0:.1f} s, scored in {t2 - t1:.1f} s "
          f"({1000 * (t2 - t1) / len(cases):.1f} ms/case incl. models)")
    print(f"learned terms: {used}\n")
    print("| score | good | ROC-AUC | shipped threshold | precision | recall | kept | undefined |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        sc = SCORES[name]
        thr = "-" if sc.threshold is None else f"{sc.keep_op} {sc.threshold:g}"
        print(f"| `{name}` | {sc.better} | {_f(r['auc'])} | {thr} | {_f(r.get('precision'))} | "
              f"{_f(r.get('recall'))} | {_f(r.get('kept'), 2)} | {r['undefined']} of {r['n']} |")
    labels = {c.variant: c.label for c in cases}
    for name, task in (("removal", "removal"), ("depth_order", "depth")):
        print(f"\nMean (min .. max) of `{name}` per variant; ROC-AUC of the good cases against each bad variant "
              f"alone:\n\n| variant | label | mean | min | max | AUC vs the good ones |\n|---|---|---|---|---|---|")
        part = [(c, q) for c, q in zip(cases, qualities) if c.task == task]
        values = [score_value({"quality": q}, name) for _, q in part]
        good = [v for (c, _), v in zip(part, values) if c.label == 1]
        for variant, (mean, lo, hi, undefined) in by_variant([c for c, _ in part], [q for _, q in part],
                                                             name).items():
            label = "-" if labels[variant] is None else labels[variant]
            bad = [v for (c, _), v in zip(part, values) if c.variant == variant]
            auc = roc_auc([1] * len(good) + [0] * len(bad), good + bad) if label != 1 else None
            print(f"| {variant} | {label} | {_f(mean, 2)} | {_f(lo, 2)} | {_f(hi, 2)} | {_f(auc)} |"
                  + (f" ({undefined} undefined)" if undefined else ""))
    sweeps = {}
    for name in ("removal", "removal_contrast", "depth_order"):
        sc = SCORES[name]
        rows = sweep(cases, qualities, name, SWEEP)
        sweeps[name] = rows
        print(f"\nKeeping `{name} {sc.keep_op} t`:\n\n| t | precision | recall | kept |\n|---|---|---|---|")
        for t, p, r, k in rows:
            print(f"| {t:g} | {_f(p)} | {_f(r)} | {_f(k, 2)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "learned_terms": used, "results": results, "sweeps": sweeps}, f, indent=1)


if __name__ == "__main__":
    main()

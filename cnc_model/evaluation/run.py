"""``cnc eval``: generate from held-out triplets with one or two pipelines and score them.

For each of the first ``n`` well-formed triplets of the shards and each seed, the pipeline generates one image from
the triplet's own conditions (caption, fg/bg depth, fg/bg CLIP embeddings, mask M) at the triplet's resolution. The
initial noise of sample ``i`` under seed ``s`` comes from its own generator (``s * 1_000_003 + i``), so two pipelines
compared with ``--compare`` see the same noise.

**Several processes** (``accelerate launch`` / torchrun, or ``cnc eval --num-processes N``, one per GPU): the
(seed, triplet) jobs are cut into batches of ``batch_size`` first, then whole batches are dealt to the processes
(``PartialState.split_between_processes``), so every image is generated in the same batch with the same generator
whatever the number of processes: the images and ``metrics.json`` are the same for 1 and N processes (on one kind of
device). Each process writes its images into ``images/<model>/``; after a barrier the main process reads them all
back (PNG: lossless) and computes every metric once. ``DIR`` must be visible to all processes (always true on one
machine). Outputs in ``DIR``:

- ``metrics.json``: ``n`` (images scored per model), ``seeds``, ``steps``, ``weights`` (``ema`` / ``raw``: which
  fuser weights were loaded, :mod:`cnc_model.loading`), and the metric keys
  (:data:`~cnc_model.evaluation.metrics.METRICS`) at the top level; with two models, ``models`` holds one such block
  per model and the top-level keys are the first model's;
- ``metrics.md``: a markdown table (one column per model, arrows = better direction);
- ``grid.png``: one row per (sample, seed) — every requested seed, up to :data:`GRID_ROWS` rows in all — with the
  sample key, seed and prompt under it; titled columns: image I, fg depth, bg depth, mask M, then each model's image
  under the model's name;
- ``images/<model>/<key>_s<seed>.png``: every generated image, and ``images/<model>/generation.json``: what made
  them (the model folder and weights, steps, guidance, prompts, resolution, shards).

**Resume.** A rerun into the same ``DIR`` reuses the images already there when ``generation.json`` matches the run's
(a batch is regenerated only when one of its images is missing; different settings regenerate everything) and
recomputes every metric from the images. ``--regenerate`` ignores existing images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnc.progress import StepProgress
from cnc_model.evaluation.metrics import METRICS, MetricSuite
from cnc_model.evaluation.models import MetricModels

logger = logging.getLogger(__name__)
#: Rows of ``grid.png`` at most (each row one sample under one seed; every seed is shown, samples are cut first).
GRID_ROWS = 16
GENERATION_FILE = "generation.json"


@dataclass
class EvalSettings:
    """Sampling settings of an evaluation (defaults = the project's protocol, at the shards' size)."""

    n: int = 100
    steps: int = 50
    seeds: list[int] = field(default_factory=lambda: [0])
    guidance_scale: float = 7.5
    batch_size: int = 4
    negative_prompt: str = ""
    prompt_suffix: str = ""
    device: str = "cpu"
    progress: bool = True
    resume: bool = True

    def generation_record(self, samples: Sequence, source: dict | None = None, shards: Sequence[str] = ()) -> dict:
        """What determines the generated images (``images/<model>/generation.json``): a rerun reuses the images of
        a model only when this record is unchanged. Per image, the key and seed are in its file name and its noise
        comes from ``seed * 1_000_003 + index``; the index of a key does not change with ``n`` (the first N)."""
        return {"model": source or {}, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "negative_prompt": self.negative_prompt, "prompt_suffix": self.prompt_suffix,
                "resolution": list(samples[0].image.shape[:2]), "shards": list(shards), "version": 1}


def load_samples(shards: Sequence[str] | str, n: int) -> list:
    """The first ``n`` well-formed triplets of ``shards`` (paths, globs, brace patterns or build folders; in build
    folders only committed shards, the trainer's rule)."""
    from cnc_model import data
    from triplets.shardio import resolve_shards

    urls = resolve_shards(shards, committed_only=True)
    samples = unique_keys(data.first_samples(urls, n))
    if not samples:
        raise ValueError(f"no readable sample in {len(urls)} shard(s) of {shards}")
    if len(samples) < n:
        logger.warning("only %d samples in the shards (asked for %d)", len(samples), n)
    sizes = {s.image.shape[:2] for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"the evaluation samples have several sizes {sorted(sizes)}; use shards of one resolution")
    return samples


def unique_keys(samples: Sequence) -> list:
    """``samples`` without the later repeats of a key (a key names a sample's images and rows: two samples with one
    key would share an image file, and under several processes the main process could score the wrong one)."""
    seen: set[str] = set()
    out = [s for s in samples if not (s.key in seen or seen.add(s.key))]
    if len(out) < len(samples):
        logger.warning("%d evaluation sample(s) repeat an earlier key and are left out", len(samples) - len(out))
    return out


def job_batches(n_jobs: int, batch_size: int) -> list[range]:
    """The job indices ``0..n_jobs-1`` in consecutive batches of ``batch_size`` (the last one may be shorter)."""
    return [range(start, min(start + batch_size, n_jobs)) for start in range(0, n_jobs, batch_size)]


def image_name(samples: Sequence, seeds: Sequence[int], j: int) -> str:
    """File name of job ``j`` (seed-major): ``<key>_s<seed>.png``."""
    return f"{samples[j % len(samples)].key}_s{seeds[j // len(samples)]}.png"


@torch.no_grad()
def generate(pipe, samples: Sequence, settings: EvalSettings, label: str = "",
             batches: Sequence[range] | None = None) -> dict[int, np.ndarray]:
    """Generate from each triplet's own conditions: ``{job j: (H, W, 3) uint8 image}``.

    Job ``j`` is seed ``seeds[j // N]`` on triplet ``j % N`` (seed-major, ``N = len(samples)``); its noise comes from
    the generator ``seed * 1_000_003 + j % N``. ``batches``: the batches of job indices to run (default: all jobs in
    :func:`job_batches` of ``settings.batch_size``; a process of a multi-process run passes its share).
    """
    pipe.set_progress_bar_config(disable=True)
    h, w = samples[0].image.shape[:2]
    jobs = [(seed, i) for seed in settings.seeds for i in range(len(samples))]
    if batches is None:
        batches = job_batches(len(jobs), settings.batch_size)
    out: dict[int, np.ndarray] = {}
    bar = StepProgress(sum(len(b) for b in batches), desc=f"generate {label}".strip(), enabled=settings.progress)
    for indices in batches:
        batch = [jobs[j] for j in indices]
        items = [samples[i] for _, i in batch]
        maps = {name: torch.from_numpy(np.stack([getattr(s, f"{name}_float")() for s in items]))[:, None]
                for name in ("fg_depth", "bg_depth")}
        images = pipe(
            prompt=[s.caption for s in items], fg_depth=maps["fg_depth"], bg_depth=maps["bg_depth"],
            mask=torch.from_numpy(np.stack([s.mask for s in items]).astype(np.float32))[:, None],
            fg_reference=np.stack([s.fg_emb for s in items]), bg_reference=np.stack([s.bg_emb for s in items]),
            num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale, height=h, width=w,
            negative_prompt=settings.negative_prompt, prompt_suffix=settings.prompt_suffix, output_type="np",
            generator=[torch.Generator().manual_seed(seed * 1_000_003 + i) for seed, i in batch]).images
        for j, image in zip(indices, (np.clip(images, 0, 1) * 255).round().astype(np.uint8)):
            out[j] = image
        bar.update(len(batch))
    bar.close()
    return out


def _reusable(folder: Path, record: dict, resume: bool) -> bool:
    """Whether the images in ``folder`` were made by ``record`` (and may be reused)."""
    path = folder / GENERATION_FILE
    if not resume or not path.is_file():
        return False
    try:
        same = json.loads(path.read_text()) == json.loads(json.dumps(record))
    except ValueError:
        same = False
    if not same:
        logger.warning("%s: generated with other settings; regenerating every image", folder)
    return same


def _generate_all(pipelines: dict[str, object], samples: Sequence, settings: EvalSettings, out: Path,
                  state, generation: dict[str, dict] | None = None) -> dict[str, np.ndarray] | None:
    """Generate this process's share with every pipeline, write it to ``images/<label>/``; on the main process
    return every pipeline's images ``(len(seeds) * N, H, W, 3)`` uint8 (after a barrier, read back from the files
    the other processes wrote), elsewhere ``None``.

    Batches whose images are all in ``images/<label>/`` under an unchanged ``generation.json``
    (``generation[label]``) are not generated again."""
    from triplets.image_io import decode_rgb

    generation = generation or {}
    n_jobs = len(settings.seeds) * len(samples)
    batches = job_batches(n_jobs, settings.batch_size)
    with state.split_between_processes(batches) as mine:
        mine = list(mine)
    if state.num_processes > 1:
        logger.info("process %d/%d: %d of %d batches", state.process_index, state.num_processes, len(mine),
                    len(batches))
    mine_images = {}
    for label, pipe in pipelines.items():
        folder = out / "images" / label
        record = generation.get(label) or settings.generation_record(samples)
        reuse = _reusable(folder, record, settings.resume)
        state.wait_for_everyone()  # every process has decided before the main one rewrites the record
        todo = [b for b in mine if not (reuse and all((folder / image_name(samples, settings.seeds, j)).is_file()
                                                      for j in b))]
        images: dict[int, np.ndarray] = {}
        if len(todo) < len(mine):
            logger.info("%s: reusing %d of %d generated images in %s", label,
                        sum(len(b) for b in mine) - sum(len(b) for b in todo), sum(len(b) for b in mine), folder)
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / GENERATION_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        if todo:
            pipe.to(settings.device)
            images = generate(pipe, samples, settings, label, batches=todo)
            folder.mkdir(parents=True, exist_ok=True)
            for j, image in images.items():
                Image.fromarray(image).save(folder / image_name(samples, settings.seeds, j))
        mine_images[label] = images
    state.wait_for_everyone()  # every process has written its images
    if not state.is_main_process:
        return None
    generated = {}
    for label, images in mine_images.items():
        missing = [j for j in range(n_jobs) if j not in images]
        for j in missing:  # reused, or another process's share (PNG is lossless: the same uint8 pixels)
            images[j] = decode_rgb((out / "images" / label / image_name(samples, settings.seeds, j)).read_bytes())
        generated[label] = np.stack([images[j] for j in range(n_jobs)])
    return generated


def _round(value: float) -> float | None:
    return None if value != value else float(f"{value:.6g}")  # NaN -> null; 6 significant digits


def markdown_table(results: dict[str, dict]) -> str:
    """``| metric | model A | model B |`` with ↑/↓ for the better direction (first row: the fuser weights)."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| weights | " + " | ".join(str(results[name].get("weights") or "n/a") for name in names) + " |"]
    for key, higher in METRICS.items():
        cells = []
        for name in names:
            v = results[name].get(key)
            cells.append("n/a" if v is None else f"{v:.4g}")
        lines.append(f"| {key} {'↑' if higher else '↓'} | " + " | ".join(cells) + " |")
    n = next(iter(results.values()))["n"]
    return "\n".join(lines) + f"\n\nn = {n} generated images per model.\n"


def make_grid(samples: Sequence, generated: dict[str, np.ndarray], seeds: Sequence[int], *, footer: str = ""):
    """``grid.png``: one row per (sample, seed) — all seeds of the first samples, :data:`GRID_ROWS` rows at most —
    captioned with the key, seed and prompt; columns titled I | fg depth | bg depth | mask M | one per model (its
    name). ``generated[label]`` holds the images seed-major (job ``j`` = seed ``j // N`` on sample ``j % N``)."""
    from triplets.inspect.grid import GridRow, labelled_grid

    n = len(samples)
    shown = max(1, min(n, GRID_ROWS // max(1, len(seeds))))
    rows = []
    for i, s in enumerate(samples[:shown]):
        for k, seed in enumerate(seeds):
            rows.append(GridRow([s.image, s.fg_depth_float(), s.bg_depth_float(), s.mask * 255,
                                 *(images[k * n + i] for images in generated.values())],
                                title=f"{s.key} · seed {seed}", text=s.caption))
    h, w = samples[0].image.shape[:2]
    return labelled_grid(["I (held out)", "fg depth", "bg depth", "mask M", *generated], rows, (w, h), footer=footer)


def report_keys() -> set[str]:
    """Per-model keys that are not records (``n``, ``weights``, the metrics)."""
    return {"n", "weights", *METRICS}


def evaluate(pipelines: dict[str, object], samples: Sequence, settings: EvalSettings, metric_models: MetricModels,
             output: str | Path, *, weights: dict[str, str | None] | None = None, state=None,
             records: dict[str, dict] | None = None, generation: dict[str, dict] | None = None) -> dict | None:
    """Generate with every pipeline, score, write ``metrics.json``, ``metrics.md``, ``grid.png``; return the json.

    Under ``accelerate launch`` / torchrun every process generates its share and only the main process scores and
    writes the reports (it returns the json; the other processes return ``None``).

    Args:
        pipelines: ``{label: CnCPipeline}`` (one or two).
        samples: :class:`triplets.sample.TripletSample` list (one resolution).
        weights: ``{label: "ema" | "raw" | None}``: which fuser weights each pipeline holds (recorded as is).
        records: ``{label: {key: value}}`` recorded per model as is (``cnc eval``: ``conditions`` -- the evaluation
            shards' build settings against the model's training ones -- and ``attention``).
        state: the ``accelerate.PartialState`` (default: the current one; a single process when not launched).
        generation: ``{label: generation record}`` (:meth:`EvalSettings.generation_record`): images already in
            ``images/<label>/`` under the same record are reused.
    """
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    generated = _generate_all(pipelines, samples, settings, out, state, generation)
    if generated is None:
        return None
    weights = weights or {}
    suite = MetricSuite(metric_models, device=settings.device, batch_size=max(settings.batch_size, 8))
    repeated = [s for _ in settings.seeds for s in samples]
    results = {}
    for label, images in generated.items():
        logger.info("scoring %s (%d images)", label, len(images))
        scores = {k: _round(v) for k, v in suite.evaluate(images, repeated).items()}
        results[label] = {"n": len(images), "weights": weights.get(label), **(records or {}).get(label, {}),
                          **scores}
    first = next(iter(results.values()))
    report = {"n": first["n"], "samples": len(samples), "seeds": list(settings.seeds), "steps": settings.steps,
              "guidance_scale": settings.guidance_scale, "negative_prompt": settings.negative_prompt,
              "prompt_suffix": settings.prompt_suffix, "metric_models": metric_models.kind(),
              "metric_networks": metric_models.describe(),
              "weights": first["weights"], **{k: first[k] for k in METRICS},
              **{k: v for k, v in first.items() if k not in report_keys()}}
    if len(results) > 1:
        report["models"] = results
    else:
        report["model"] = next(iter(results))
    (out / "metrics.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (out / "metrics.md").write_text(markdown_table(results))
    footer = (f"{settings.steps} DDIM steps, guidance {settings.guidance_scale:g}, seeds "
              f"{', '.join(map(str, settings.seeds))}; n = {first['n']} images per model")
    make_grid(samples, generated, settings.seeds, footer=footer).save(out / "grid.png")
    logger.info("metrics written to %s", out / "metrics.json")
    return report

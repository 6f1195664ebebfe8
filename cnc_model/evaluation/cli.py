"""``cnc eval``: score one pipeline, or two side by side, on held-out triplets.

    cnc eval out/train/joint --shards out/val --output out/eval/joint --n 500 --steps 50 --seeds 0
    cnc eval out/train/joint --compare out/train/global --shards out/val --output out/eval/joint-vs-global
    cnc eval out/train/joint --shards out/val --output out/eval/tiny --metrics-models tiny     # offline smoke run

Heavy imports happen inside the command so ``cnc --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

logger = logging.getLogger(__name__)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _parse_seeds(spec: str) -> list[int]:
    """``0,1,2`` or ``0-3`` (inclusive) -> ``[0, 1, 2]`` / ``[0, 1, 2, 3]``."""
    seeds: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                seeds.extend(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        _fail(f"--seeds takes integers like 0,1,2 or 0-3, got {spec!r}")
    if not seeds:
        _fail("--seeds is empty")
    return sorted(set(seeds), key=seeds.index)


def _labels(paths: list[str]) -> list[str]:
    from cnc.base.location import resolve

    names = [resolve(p).name or "pipeline" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{name}-{tag}" for name, tag in zip(names, "AB")]
    return names


def eval_command(
    pipeline: str = typer.Argument(..., help="Pipeline folder, cnc train output folder or checkpoint-N folder "
                                             "(local or a URL)."),
    compare: str = typer.Option(None, "--compare", help="A second pipeline/run/checkpoint, scored on the same "
                                                         "samples and seeds."),
    shards: list[str] = typer.Option(..., "--shards", help="Held-out shards: build folder, tar paths, globs, "
                                                           "{000..009} patterns (repeatable)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for metrics.json, metrics.md, grid.png."),
    n: int = typer.Option(100, "--n", min=2, help="Triplets to evaluate (the first N well-formed ones)."),
    steps: int = typer.Option(50, "--steps", min=1, help="DDIM steps."),
    seeds: str = typer.Option("0", "--seeds", help="Seeds, e.g. 0 or 0,1,2 or 0-3: one image per triplet and seed."),
    guidance: float = typer.Option(7.5, "--guidance", min=0.0, help="Classifier-free guidance scale."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per pipeline call."),
    metrics_models: str = typer.Option(
        None, "--metrics-models", help="Folder with hub/checkpoints/ (Inception, AlexNet), clip/ and dpt/; or 'tiny' "
                                       "(seeded random networks: offline smoke runs). Default: the torch hub and "
                                       "Hugging Face caches."),
    clip_model: str = typer.Option(None, "--clip-model", help="CLIP model for CLIPScore and region similarity "
                                                              "(default: openai/clip-vit-large-patch14)."),
    depth_model: str = typer.Option(None, "--depth-model", help="DPT model for depth MAE (default: Intel/dpt-large)."),
    negative_prompt: str = typer.Option(None, "--negative-prompt", help="Default: the reference demo's.",
                                        show_default=False),
    prompt_suffix: str = typer.Option(None, "--prompt-suffix", help="Default: the reference demo's.",
                                      show_default=False),
    reference_prompts: bool = typer.Option(True, "--reference-prompts/--no-reference-prompts",
                                           help="Reference negative prompt and suffix as defaults (off: both empty)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Generate from held-out triplets and report FID, IS, CLIPScore, SSIM, LPIPS, depth MAE and region scores."""
    import torch

    from cnc.base.errors import UserError
    from cnc_model.cli import load_pipeline_or_fail, sampling_prompts
    from cnc_model.evaluation import models as metric_models
    from cnc_model.evaluation.run import EvalSettings, evaluate, load_samples

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    seed_list = _parse_seeds(seeds)
    negative_prompt, prompt_suffix = sampling_prompts(negative_prompt, prompt_suffix, reference_prompts)
    # 1. everything that can be missing is checked before any generation
    paths = [pipeline] + ([compare] if compare is not None else [])
    from cnc.base.location import resolve

    for p in paths:
        if not resolve(p).exists():
            _fail(f"PIPELINE {p} does not exist")
    mm = metric_models.resolve(metrics_models, clip_model, depth_model)
    problems = metric_models.check(mm)
    if problems:
        for line in problems:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(code=2)
    try:
        samples = load_samples(shards, n)
    except (UserError, ValueError, FileNotFoundError) as err:
        _fail(f"--shards: {str(err).splitlines()[0]}")
    pipes = {label: load_pipeline_or_fail(p) for label, p in zip(_labels(paths), paths)}
    # 2. generate and score
    settings = EvalSettings(n=n, steps=steps, seeds=seed_list, guidance_scale=guidance, batch_size=batch_size,
                            negative_prompt=negative_prompt, prompt_suffix=prompt_suffix, device=device)
    report = evaluate(pipes, samples, settings, mm, output)
    typer.echo((output / "metrics.md").read_text())
    typer.echo(f"n={report['n']}; wrote {output / 'metrics.json'}, {output / 'metrics.md'}, {output / 'grid.png'}")


def register(app: typer.Typer) -> None:
    """Add ``cnc eval`` to the root app."""
    app.command("eval")(eval_command)

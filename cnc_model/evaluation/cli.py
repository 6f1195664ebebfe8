"""``cnc eval``: score one pipeline, or two side by side, on held-out triplets.

    cnc eval out/train/joint --shards out/val --output out/eval/joint --n 500 --steps 50 --seeds 0
    cnc eval out/train/joint --compare out/train/global --shards out/val --output out/eval/joint-vs-global
    cnc eval out/train/joint --shards out/val --output out/eval/tiny --metrics-models tiny     # offline smoke run
    cnc eval out/train/joint/checkpoint-2000 --compare out/train/joint/checkpoint-2000 --compare-weights raw ...
    cnc eval out/train/joint --shards out/val --output out/eval/joint --workers 8                # 8 GPUs
    accelerate launch --num_processes 8 -m cnc.cli eval out/train/joint --shards out/val ...     # the same

With several processes (``--workers``, default ``auto``: every visible GPU; or under ``accelerate launch`` /
torchrun) every process generates its share of the images and the main process scores them all
(:mod:`~cnc_model.evaluation.run`); ``--workers N`` re-launches the command through ``accelerate launch``
after every input has been checked. A rerun into the same ``--output`` reuses the images already generated with the
same settings and recomputes the metrics; the metrics go to ``--report-to`` (TensorBoard by default, as ``cnc
train``) at the training step of the evaluated weights.

Heavy imports happen inside the command so ``cnc --help`` stays fast.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import typer

from cnc.base.errors import UserError
from cnc.base.location import resolve
from cnc.config import MAX_GUIDANCE, MAX_STEPS
from cnc.options import Weights, choice_enum, deprecated_alias, value_of
from cnc_model.evaluation.trackers import check_report_to, report_metrics, source_record
from cnc_model.loading import WEIGHTS_HELP
from cnc_model.sources import base_model_problems, describe_source, load_source, pipeline_dtype, sampling_prompts

logger = logging.getLogger(__name__)
#: ``--report-to``: the trackers of ``train.report_to``.
ReportTo = choice_enum("ReportTo", ("tensorboard", "wandb", "mlflow", "none"))


def _check_numbers(n: int, steps: int, guidance: float, batch_size: int) -> None:
    """Refuse, in one ``error:`` line each (exit 2, before anything is loaded), numbers no evaluation can use: the
    bounds of the configs (:mod:`cnc.config`) and enough triplets for FID."""

    from cnc_model.evaluation.metrics import MIN_SAMPLES

    problems = []
    if n < MIN_SAMPLES:
        problems.append(f"--n {n}: FID needs at least {MIN_SAMPLES} triplets")
    if not 1 <= steps <= MAX_STEPS:
        problems.append(f"--steps {steps}: must be 1 .. {MAX_STEPS}")
    if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        problems.append(f"--guidance {guidance}: must be a number in 0 .. {MAX_GUIDANCE:g}")
    if batch_size < 1:
        problems.append(f"--batch-size {batch_size}: must be at least 1")
    if problems:
        raise UserError("\n".join(problems))


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
        raise UserError(f"--seeds takes integers like 0,1,2 or 0-3, got {spec!r}") from None
    if not seeds:
        raise UserError("--seeds is empty")
    return sorted(set(seeds), key=seeds.index)


def _labels(paths: list[str], weights: list[str | None]) -> list[str]:
    """Model names for the report: the folder names; the same folder twice -> suffixed by weights (or A/B)."""
    names = [resolve(p).name or "pipeline" for p in paths]
    if len(set(names)) < len(names):
        tags = weights if len(set(weights)) == len(weights) and None not in weights else list("AB")
        names = [f"{name}-{tag}" for name, tag in zip(names, tags)]
    return names


def _launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` / torchrun / MPI."""
    return any(int(os.environ.get(var, "1") or 1) > 1 for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))


def _num_processes(spec: str, device: str) -> int:
    """``auto`` -> every visible GPU when generating on CUDA, else 1; ``N`` -> N (at most the GPUs on CUDA)."""
    import torch

    on_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if spec == "auto":
        return max(1, torch.cuda.device_count()) if on_cuda else 1
    try:
        count = int(spec)
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"--workers takes a positive integer or auto, got {spec!r}")
    if on_cuda and count > torch.cuda.device_count():
        raise UserError(f"--workers {count} exceeds the {torch.cuda.device_count()} visible GPU(s) (one process "
                        "per GPU)")
    return count


def _command_line(ctx: typer.Context, skip: tuple[str, ...]) -> list[str]:
    """The arguments of this invocation (as parsed), without the parameters named in ``skip``."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in skip or value is None:
            continue
        value = [getattr(v, "value", v) for v in value] if param.multiple else getattr(value, "value", value)
        if param.param_type_name == "argument":
            args.append(str(value))
        elif getattr(param, "is_flag", False):
            if value or param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for item in value if param.multiple else [value]:
                args += [param.opts[0], str(item)]
    return args


def _relaunch(ctx: typer.Context, count: int) -> None:
    """Run this command again in ``count`` processes on this machine (``accelerate launch --multi_gpu``, which
    starts them with torch.distributed.run; on CPUs they talk over gloo) and exit with its status."""
    with socket.socket() as sock:  # a free port for the processes' rendezvous, on the loopback interface only
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
           "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "cnc.cli", ctx.info_name or "eval", *_command_line(ctx, skip=("workers", "num_processes"))]
    logger.info("generating in %d processes: %s", count, " ".join(cmd))
    raise typer.Exit(code=subprocess.run(cmd, check=False).returncode)


def eval_command(
    ctx: typer.Context,
    pipeline: str = typer.Argument(..., help="Pipeline folder, cnc train output folder or checkpoint-N folder "
                                             "(local or a URL)."),
    compare: str = typer.Option(None, "--compare", help="A second pipeline/run/checkpoint, scored on the same "
                                                         "samples and seeds."),
    shards: list[str] = typer.Option(..., "--shards", help="Held-out shards: build folder, tar paths, globs, "
                                                           "{000..009} patterns (repeatable)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for metrics.json, metrics.md, grid.png and "
                                                           "images/ (a rerun reuses the images generated there)."),
    n: int = typer.Option(100, "--n", "-n", help="Triplets to evaluate (the first N well-formed ones; at least "
                                                  "2)."),
    steps: int = typer.Option(50, "--steps", help="DDIM steps."),
    seeds: str = typer.Option("0", "--seeds", help="Seeds, e.g. 0 or 0,1,2 or 0-3: one image per triplet and seed."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per pipeline call."),
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
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (several processes: each its "
                                                        "own GPU)."),
    weights: Weights = typer.Option(None, "--weights", help=WEIGHTS_HELP, show_default=False),
    compare_weights: Weights = typer.Option(None, "--compare-weights", help="--weights of the --compare model.",
                                            show_default=False),
    workers: str = typer.Option(
        "auto", "--workers", help="Processes generating in parallel (one per GPU; on CPUs gloo): auto = every "
                                  "visible GPU on CUDA, else 1. Not needed under accelerate launch / torchrun."),
    num_processes: str = typer.Option(None, "--num-processes", hidden=True, help="Deprecated alias of --workers."),
    report_to: ReportTo = typer.Option("tensorboard", "--report-to", help="Tracker of the metrics, as cnc train's "
                                       "train.report_to (TensorBoard: OUTPUT/logs), at the evaluated weights' "
                                       "training step."),
    regenerate: bool = typer.Option(False, "--regenerate", help="Generate every image again (default: reuse the "
                                    "images of an earlier run into --output made with the same settings)."),
    dtype: str = typer.Option("float32", "--dtype", help="Precision of the pipelines: float32, float16 or bfloat16."),
    attention_fp32_logits: bool = typer.Option(
        None, "--attention-fp32-logits/--no-attention-fp32-logits",
        help="Attention logits and softmax in fp32 under --dtype float16/bfloat16 (the reference's precision). "
             "Default: each run's model.attention_fp32_logits (off for other folders).", show_default=False),
) -> None:
    """Generate from held-out triplets and report FID, IS, CLIPScore, SSIM, LPIPS, depth MAE and region scores."""
    import torch

    from cnc_model.evaluation import models as metric_models  # torch, torchmetrics: heavy
    from cnc_model.evaluation.metrics import MIN_SAMPLES  # lazy: torch
    from cnc_model.evaluation.run import EvalSettings, evaluate, load_samples

    workers = deprecated_alias(workers, num_processes, "--num-processes", "--workers", default="auto")
    weights, compare_weights, report_to = value_of(weights), value_of(compare_weights), value_of(report_to)

    _check_numbers(n, steps, guidance, batch_size)
    seed_list = _parse_seeds(seeds)
    negative_prompt, prompt_suffix = sampling_prompts(negative_prompt, prompt_suffix, reference_prompts)
    # 1. everything that can be missing is checked before any generation
    paths = [pipeline] + ([compare] if compare is not None else [])
    chosen = [weights, compare_weights][: len(paths)]
    if compare_weights is not None and compare is None:
        raise UserError("--compare-weights needs --compare")
    for p, option in zip(paths, ("PIPELINE", "--compare")):
        if not resolve(p).exists():
            raise UserError(f"{option} {p} does not exist")
    sources = [describe_source(p, option, w) for p, option, w in zip(paths, ("PIPELINE", "--compare"), chosen)]
    # the runs' base models (one line per missing model, before anything loads)
    problems = [line for source in sources for line in base_model_problems(source)]
    mm = metric_models.resolve(metrics_models, clip_model, depth_model)
    problems += metric_models.check(mm)
    check_report_to(report_to)
    if problems:
        raise UserError("\n".join(dict.fromkeys(problems)))  # one error line per missing model or network
    try:
        samples = load_samples(shards, n)
    except (UserError, ValueError, FileNotFoundError) as err:
        raise UserError(f"--shards: {str(err).splitlines()[0]}") from None
    if len(samples) < MIN_SAMPLES:
        raise UserError(f"--shards: {len(samples)} well-formed triplet(s) found; FID needs at least {MIN_SAMPLES} "
                        f"(add shards)")

    from triplets.conditions import compare_builds  # lazy: torch / transformers

    torch_dtype = pipeline_dtype(dtype)
    checks = [compare_builds(source.conditions_record(), list(shards)) for source in sources]
    # 2. several processes: start them (each checks the inputs again, cheaply) unless already launched
    if not _launched():
        count = _num_processes(workers, device)
        if count > 1:
            _relaunch(ctx, count)
    elif workers != "auto":
        logger.warning("--workers %s ignored: already running under a launcher", workers)
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())  # CPUs: gloo between processes
    if device == "auto" or (device == "cuda" and state.num_processes > 1):
        device = str(state.device) if state.num_processes > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    # 3. generate (every process its share; images of an earlier run with the same settings are reused) and score
    labels = _labels(paths, [s.weights for s in sources])
    pipes, held, records, generation = {}, {}, {}, {}
    settings = EvalSettings(n=n, steps=steps, seeds=seed_list, guidance_scale=guidance, batch_size=batch_size,
                            negative_prompt=negative_prompt, prompt_suffix=prompt_suffix, device=device,
                            progress=state.is_main_process, resume=not regenerate)
    from triplets.shardio import resolve_shards  # fsspec: heavy

    urls = resolve_shards(shards, committed_only=True)
    for label, source, check in zip(labels, sources, checks):
        _, pipes[label] = load_source(source)
        held[label] = source.weights
        pipe = pipes[label]
        if attention_fp32_logits is not None:
            pipe.set_attention(fp32_logits=attention_fp32_logits)
        pipe.to(dtype=torch_dtype)
        if state.is_main_process:
            (logger.warning if check["differences"] or not check["trained_known"] else logger.info)(
                "%s: %s", label, check["line"])
        records[label] = {"conditions": {k: v for k, v in check.items() if k != "line"},
                          "attention": {"resize_mode": pipe.soft_guidance_resize,
                                        "fp32_logits": pipe.attention_fp32_logits, "dtype": dtype}}
        # what determines the images (a rerun reuses them only when this is unchanged): precision included
        generation[label] = {**settings.generation_record(samples, source_record(source), urls),
                             "attention": records[label]["attention"]}
    report = evaluate(pipes, samples, settings, mm, output, weights=held, state=state, records=records,
                      generation=generation)
    if report is None:  # not the main process
        return
    report_metrics(report, output, report_to, step=sources[0].step, labels=labels,
                   steps={label: source.step for label, source in zip(labels, sources)})
    typer.echo((output / "metrics.md").read_text())
    typer.echo(f"n={report['n']}; wrote {output / 'metrics.json'}, {output / 'metrics.md'}, {output / 'grid.png'}")


def register(app: typer.Typer) -> None:
    """Add ``cnc eval`` to the root app."""
    app.command("eval")(eval_command)

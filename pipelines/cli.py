"""Sub-commands of ``cnc`` that belong to ``pipelines``: ``cnc build``, ``cnc filter``, ``cnc score``."""

from __future__ import annotations

import tempfile

import typer

from cnc.base.errors import UserError
from cnc.config import load_config
from cnc.options import choice_enum, value_of
from triplets.config import INPUT_FORMATS, BuildConfig

#: ``--input-format``: the choices of the config key ``input_format``.
InputFormat = choice_enum("InputFormat", ("auto", *INPUT_FORMATS))

BUILD_HELP = """Build triplet shards from an image collection on Ray (resumable, exactly-once).

Reruns with the same --input/--config/--output resume: committed shards are skipped, partial ones
rebuilt. Exit code 0 = done; 1 = failures above max_failure_fraction or shards left uncommitted;
2 = bad config/input, missing model, an output folder holding another build, or an --address where no Ray
cluster answers; 130/143 = stopped by SIGINT/SIGTERM (committed shards kept, rerun to resume).
"""


def build(
    config: str | None = typer.Option(None, "--config", "-c", help="Build config YAML (configs/build/*.yaml)."),
    input: str = typer.Option(..., "--input", "-i", help="Image folder, COCO captions .json, .tar or brace pattern, "
                                                         "or .parquet/.csv/.jsonl table(s) (file, folder or glob); "
                                                         "a local path or a URL (s3://, gs://, ...)."),
    output: str = typer.Option(..., "--output", "-o", help="Output folder or URL (shards at the top; plan, markers, "
                                                           "errors/, manifest and dataset card under _cnc/)."),
    overrides: list[str] = typer.Option([], "--set", help="Config override key=value (dotted keys), repeatable."),
    address: str | None = typer.Option(
        None, "--address", help="Join a Ray cluster ('auto' or HOST:PORT); default: $RAY_ADDRESS if set, else a "
             "private local "
             "Ray on 127.0.0.1."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also recompute the failed samples of "
                                                                    "committed shards."),
    input_format: InputFormat = typer.Option(None, "--input-format", help="The input's format (= --set "
                                             "input_format=...); default: the config's (auto: detected from the "
                                             "path).", show_default=False),
    workers: int = typer.Option(None, "--workers", min=1, help="Model workers (= --set ray.num_workers=N); default: "
                                "the config's (one per GPU, or one per two CPUs).", show_default=False),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Live progress bar "
                                                                                   "(default: on a terminal)."),
    verify: bool = typer.Option(False, "--verify", help="On resume, re-hash every committed shard against its "
                                                        "marker (default: marker + size; downloads the whole build "
                                                        "on object stores)."),
    allow_model_change: bool = typer.Option(
        False, "--allow-model-change", help="Resume although a model's weights changed (other hub commit or weight "
                                            "hash); the plan and manifest record both identities."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Write (or check) OUTPUT/plan.json and print its "
                                                              "summary as JSON (items, shards, input files); loads no "
                                                              "model and starts no Ray."),
) -> None:
    from pipelines.build import build_entry

    code = build_entry(config, input, output, overrides, address=address, retry_failed=retry_failed,
                       input_format=value_of(input_format), progress=progress, verify=verify,
                       allow_model_change=allow_model_change, plan_only=plan_only, workers=workers)
    raise typer.Exit(code)


def filter_build(
    source: str = typer.Argument(..., help="Build folder (committed shards), glob, brace pattern or tars."),
    output: str = typer.Option(..., "--output", "-o", help="New folder (local path or URL) for the filtered copy."),
    where: list[str] = typer.Option([], "--where", "-w", help="SCORE OP NUMBER, e.g. 'removal>=0.5', "
                                    "'depth_order>=0.5', 'mask_components<=2'; repeatable, all must hold."),
    recommended: bool = typer.Option(False, "--recommended", help="Add the shipped thresholds chosen on the "
                                     "labelled benchmark: removal>=0.5 and depth_order>=0.5 (docs/build.md, "
                                     "'Quality scores', for their precision and recall)."),
    keep_unscored: bool = typer.Option(False, "--keep-unscored/--drop-unscored", help="Samples that cannot be "
                                       "judged (no quality scores, or a score undefined on the sample): keep or "
                                       "drop them."),
    allow_version_mix: bool = typer.Option(False, "--allow-version-mix", help="Accept samples scored by another "
                                           "quality version, treated as unscored (refused by default: rescore "
                                           "them with `cnc score`)."),
    verify: bool = typer.Option(False, "--verify", help="On resume, re-hash committed output shards."),
) -> None:
    """Write a filtered copy of a build (exactly once per shard; a rerun resumes). Kept samples are copied byte
    for byte; each output marker counts the dropped samples by condition.

    Scores: removal, removal_changed, removal_contrast, clip_sim, depth_order, depth_margin, mask_area,
    mask_components, mask_border, mask_bbox_fill (see docs/build.md, "Quality scores", for what each measures, its
    ROC-AUC on the labelled benchmark and a precision/recall table to pick thresholds from).
    """
    from pipelines.derive import run_filter

    result = run_filter(source, output, where, keep_unscored=keep_unscored, allow_version_mix=allow_version_mix,
                        recommended=recommended, verify=verify)
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(result.dropped.items())) or "none"
    typer.echo(f"{result.output}: kept {result.samples} of {result.items} samples in {result.shards_total} shards "
               f"({result.shards_built} written, {result.shards_skipped} already committed); dropped: {dropped}"
               + (f"; {result.failures} unreadable" if result.failures else ""))


def score_build(
    source: str = typer.Argument(..., help="Build folder (committed shards), glob, brace pattern or tars."),
    output: str = typer.Option(..., "--output", "-o", help="New folder (local path or URL) for the scored copy."),
    config: str | None = typer.Option(None, "--config", "-c", help="Build config naming the models.",
                                      show_default="SOURCE/_cnc/config.yaml"),
    overrides: list[str] = typer.Option([], "--set", help="Config override key=value, repeatable."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default: the config's)."),
    verify: bool = typer.Option(False, "--verify", help="On resume, re-hash committed output shards."),
) -> None:
    """Add or refresh quality scores: a copy of SOURCE whose sample json carries ``quality`` of the current version
    (shards built without scores, or with an older version's), recomputed from the stored fields with the config's
    depth and CLIP models (committed per shard like a build; a rerun resumes). Every other member is copied byte
    for byte."""
    from pipelines.derive import run_score

    overrides = list(overrides) + ([f"device={device}"] if device else [])  # validated with the config
    cfg = load_config(BuildConfig, _source_config(source, config), overrides)
    result = run_score(source, output, cfg, verify=verify)
    typer.echo(f"{result.output}: scored {result.samples} of {result.items} samples in {result.shards_total} shards "
               f"({result.shards_built} written, {result.shards_skipped} already committed)"
               + (f"; {result.failures} failed (see errors/)" if result.failures else ""))


def _source_config(source: str, config: str | None) -> str:
    """``--config``, else the source build's config (``_cnc/config.yaml``, or ``config.yaml`` beside the tars in a
    folder of the older layout; copied to a local temporary file for a URL)."""
    from pipelines.derive import source_build  # ray, numpy (through the build stack): heavy
    from triplets.shardio import resolve_shards
    from triplets.shardio.names import CONFIG_FILE, SIDECAR_DIR

    resolve_shards(source, committed_only=True)  # a source naming nothing is the first thing to report
    if config is not None:
        return config
    build = source_build(source)
    found = build.file(CONFIG_FILE) if build is not None else None
    if found is None or not found.isfile():
        raise UserError(f"no {SIDECAR_DIR}/{CONFIG_FILE} (or {CONFIG_FILE}) in {source}: give the build config "
                        "naming the models with --config")
    if found.is_local:
        return str(found.local_path())
    tmp = tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False)
    with tmp:
        tmp.write(found.read_bytes())
    return tmp.name


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("build", help=BUILD_HELP)(build)
    app.command("filter")(filter_build)
    app.command("score")(score_build)

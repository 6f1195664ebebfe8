"""Sub-commands of ``cnc`` that belong to ``triplets``."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from cnc.base.errors import UserError

log = logging.getLogger(__name__)


def _default_out(paths: list[str]) -> Path | None:
    """``PATH/inspect`` for a writable local build folder, ``inspect/`` beside a local tar; ``None`` (write nothing
    unless ``--out`` is given) for object-store inputs and read-only datasets."""
    import os

    from cnc.base.location import resolve

    first = resolve(paths[0]) if not paths[0].startswith("pipe:") else None
    if first is not None and first.is_local:
        folder = first.local_path() if first.isdir() else first.local_path().parent
        if os.access(folder, os.W_OK):
            return folder / "inspect"
    return None


def inspect(
    paths: list[str] = typer.Argument(..., help="Build output folder, glob of tars ('out/*.tar'), brace pattern "
                                                "('out/{000000..000009}.tar') or tar file(s)."),
    n: int = typer.Option(16, "--n", "-n", min=0, help="Samples to show (0: validate and summarise only)."),
    keys: str | None = typer.Option(None, "--keys", help="Comma-separated keys to show instead of a random pick."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Local report folder.",
                                       show_default="PATH/inspect for a local folder, inspect/ beside a local tar; "
                                                    "nothing for a URL or a read-only dataset"),
    out: Path | None = typer.Option(None, "--out", hidden=True, help="Deprecated alias of --output."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout (logs and progress on "
                                "stderr); report files are written only with --output or --html."),
    card: bool = typer.Option(False, "--card", help="Also write or refresh the dataset card of a build folder "
                              "(_cnc/README.md + .huggingface.yaml) from its manifest."),
    html: bool = typer.Option(False, "--html", help="Also write a self-contained index.html."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample choice (same seed, same keys)."),
    per_page: int = typer.Option(8, "--per-page", min=1, help="Rows per contact-sheet PNG."),
    tile: int | None = typer.Option(None, "--tile", min=16, help="Tile size in pixels.",
                                    show_default="the resolution within [96, 256]"),
    max_shards: int | None = typer.Option(None, "--max-shards", min=1, help="Read only the first N shards."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes reading shards in parallel."),
    decode: bool = typer.Option(True, "--decode/--no-decode", help="Decode every sample (dtypes, shapes, "
                                "statistics); --no-decode checks structure, markers and keys only."),
    worst: int = typer.Option(4, "--worst", min=0, help="Worst samples per quality score drawn as "
                              "worst_<score>.png (and in the HTML); 0 = none."),
    max_member_mb: float = typer.Option(256.0, "--max-member-mb", min=0.001, help="Size cap of one tar member "
                                        "(larger members are a finding and are not read)."),
) -> None:
    """Validate shards, summarise them and render contact sheets of a few samples.

    Exit status: 0 valid (warnings allowed); 1 invalid, with one line per problem on stdout (in the JSON with
    --json); 2 nothing matches PATHS or a --keys key is not found.
    """
    import json

    from rich.console import Console
    from rich.progress import Progress

    from cnc.options import deprecated_alias
    from triplets.inspect import inspect_shards, print_report, write_report
    from triplets.inspect.report import summary_dict
    from triplets.shardio import resolve_shards

    output = deprecated_alias(output, out, "--out", "--output")

    total = len(resolve_shards(paths))  # a UserError (nothing matches, unknown scheme) exits 2 in one line
    wanted = [k.strip() for k in keys.split(",") if k.strip()] if keys else None
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("reading shards", total=min(total, max_shards or total))
        result = inspect_shards(paths, n=n, seed=seed, keys=wanted, decode=decode, max_shards=max_shards,
                                workers=workers, max_member_bytes=int(max_member_mb * 2**20),
                                progress=lambda _check: bar.advance(task), worst=worst)
    report_console = Console(stderr=True) if as_json else Console()  # --json: stdout holds only the JSON
    print_report(result, report_console)
    written: list[str] = []
    report_dir = output or _default_out(paths)
    wants_files = html or output is not None or (not as_json and bool(result.samples or result.worst))
    if wants_files and report_dir is None:
        log.warning("report files not written: the input is not a writable local folder; pass --output DIR")
    elif wants_files:
        files = write_report(result, report_dir, html=html, per_page=per_page, tile=tile)
        written = [str(p) for p in files.sheets + files.worst + [files.html, files.summary_json] if p is not None]
        for path in files.sheets + files.worst + [files.html]:
            if path is not None and not as_json:
                typer.echo(f"wrote {path}")
    if card:
        written += _write_cards(paths)
    v = result.validation
    if as_json:
        typer.echo(json.dumps({**summary_dict(result), "files": written}, sort_keys=True))
    else:
        for problem in v.problems:
            typer.echo(str(problem))
        if v.problem_count > len(v.problems):
            typer.echo(f"... and {v.problem_count - len(v.problems)} more problems")
    if result.missing_keys:
        raise UserError(f"keys not found: {', '.join(result.missing_keys)}")
    if not v.ok:
        typer.echo(f"INVALID: {v.error_count} errors in {len(v.shards)} shards", err=True)
        raise typer.Exit(1)


def _write_cards(paths: list[str]) -> list[str]:
    """``--card``: (re)write the dataset card of every build folder among ``paths``."""
    import logging

    from cnc.base.location import resolve
    from triplets.card import write_card

    written = []
    for p in paths:
        if p.startswith("pipe:") or not resolve(p).isdir():
            logging.getLogger(__name__).warning("--card: %s is not a build folder; skipped", p)
            continue
        try:
            written += write_card(p)
        except FileNotFoundError as exc:
            raise UserError(f"--card: {exc}") from None
    return written


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("inspect")(inspect)

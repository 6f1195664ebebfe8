"""``cnc models download|list`` and ``cnc config show|list``.

``cnc models download --config C`` fetches every model the build or train config ``C`` names: hub ids into the
Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, or ``--cache-dir DIR/hub``), known checkpoint files (SAM) into
the cnc cache (``$CNC_CACHE/files``, or ``--cache-dir DIR/files``) with their sha256 checked. Builds and training
then resolve from those caches (:func:`cnc.hub.resolve_pretrained`). ``cnc models list`` shows each model's state,
location and size without downloading anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import typer
import yaml

from cnc.config import ConfigError, load_config, packaged_config_names, resolve_config_path
from cnc.config_docs import render_markdown
from cnc.downloads import KNOWN_FILES, DownloadError, cached_file, download_file, files_dir, known_file, unreachable
from cnc.hub import TINY
from cnc.options import choice_enum
from triplets.config import BuildConfig

log = logging.getLogger(__name__)
#: Configs ``cnc models`` covers when no ``--config`` is given: the demo build and the first training stage.
DEFAULT_CONFIGS = ("build/default", "train/local")

models_app = typer.Typer(help="Download and list the models a build or train config names.", no_args_is_help=True)
config_app = typer.Typer(help="Show the shipped configs (start a custom copy from one) and document every key.",
                         no_args_is_help=True)


@dataclass
class ModelRef:
    """One model of a config: its key, value, hub revision, and whether it is a single file."""

    key: str
    model_id: str
    revision: str | None = None
    is_file: bool = False
    variant: str | None = None


def config_models(name: str) -> list[ModelRef]:
    """The models a build or train config names (the kind is detected from the file: ``stage`` = train).

    Raises:
        cnc.config.ConfigError: unknown file/name or invalid config.
    """
    path = resolve_config_path(name, "build")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(raw, dict) and "stage" in raw:
        from cnc_model.training.config import TrainConfig

        cfg = load_config(TrainConfig, path)
        m = cfg.model
        refs = [ModelRef("model.pretrained_model_name_or_path", m.pretrained_model_name_or_path, m.revision,
                         variant=m.variant)]
        refs += [ModelRef(k, v) for k, v in (("model.local_fuser", m.local_fuser), ("model.global_fuser",
                                                                                      m.global_fuser)) if v]
        return refs

    cfg = load_config(BuildConfig, path)
    from triplets.conditions import FILE_KEYS

    return [ModelRef(k, v, is_file=k in FILE_KEYS) for k, v in cfg.model_ids().items()]


def _refs(configs: list[str] | None) -> list[ModelRef]:
    seen, out = set(), []
    for name in configs or DEFAULT_CONFIGS:
        for ref in config_models(name):
            key = (ref.key, ref.model_id) if ref.model_id == TINY else (ref.model_id, ref.revision)
            if key not in seen:
                seen.add(key)
                out.append(ref)
    return out


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "?"


def locate(ref: ModelRef) -> tuple[str, Path | None]:
    """``(state, path)`` without network: state is ``tiny`` | ``local`` | ``cached`` | ``missing``."""
    if ref.model_id == TINY:
        return "tiny", None
    p = Path(ref.model_id).expanduser()
    if p.exists():
        return "local", p
    if ref.is_file:
        spec = known_file(ref.model_id)
        found = cached_file(spec) if spec else None
        return ("cached", found) if found else ("missing", None)
    if ref.model_id.startswith(("/", "./", "../", "~")):
        return "missing", None
    from huggingface_hub import snapshot_download

    try:
        return "cached", Path(snapshot_download(ref.model_id, revision=ref.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache
        return "missing", None


def hub_patterns(repo_id: str, revision: str | None, variant: str | None) -> tuple[list[str] | None, list[str]]:
    """``(allow, ignore)`` for ``snapshot_download``: configs, tokenizers and one weight format (safetensors when the
    repo has them, else .bin), no other frameworks, no safety checker, no single-file ``.ckpt`` duplicates."""
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo_id, revision=revision)
    suffix = ".safetensors" if any(f.endswith(".safetensors") for f in files) else ".bin"
    # a diffusers pipeline keeps its weights in subfolders; a root-level file is a single-file duplicate
    weights = [f"*/*{suffix}" if "model_index.json" in files else f"*{suffix}"]
    allow = ["*.json", "*.txt", "*.model", *weights]
    ignore = ["safety_checker/*", "*.ckpt", "*non_ema*", "*.msgpack", "*.h5", "*.onnx*"]
    if variant is None:
        ignore += ["*.fp16.*"]
    return allow, ignore


def download_ref(ref: ModelRef, cache_dir: Path | None, base_url: str | None, progress: bool) -> Path | None:
    """Download one model (``None`` for tiny and local ones).

    Raises:
        cnc.downloads.DownloadError: one line naming the model and the reason.
    """
    state, path = locate(ref)
    if state in ("tiny", "local"):
        return path
    if ref.is_file:
        spec = known_file(ref.model_id)
        if spec is None:
            raise DownloadError(f"'{ref.model_id}' is neither a local file nor a known published checkpoint "
                                f"({', '.join(sorted(_known()))})")
        return download_file(spec, (cache_dir / "files") if cache_dir else files_dir(), base_url, progress)
    if ref.model_id.startswith(("/", "./", "../", "~")):
        raise DownloadError(f"local folder '{ref.model_id}' does not exist (nothing to download)")
    if state == "cached" and cache_dir is None:
        return path
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise DownloadError("not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    if (why := unreachable(constants.ENDPOINT)) is not None:
        raise DownloadError(f"the hub {constants.ENDPOINT}: {why}")
    hub_cache = (cache_dir / "hub") if cache_dir else None
    try:
        allow, ignore = hub_patterns(ref.model_id, ref.revision, ref.variant)
        return Path(snapshot_download(ref.model_id, revision=ref.revision, cache_dir=hub_cache, allow_patterns=allow,
                                      ignore_patterns=ignore))
    except Exception as exc:  # noqa: BLE001 - offline, 404, gated, disk full: one line each
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DownloadError(f"hub download failed ({type(exc).__name__}{': ' + reason if reason else ''})") from None


def _known() -> list[str]:
    return list(KNOWN_FILES)


@models_app.command("download")
def download(
    configs: list[str] = typer.Option(None, "--config", "-c", help="Build/train config file or shipped name "
                                      "(repeatable; default: build/default and train/local)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Download into DIR/hub (hub models) and DIR/files "
                                   "(SAM); then set HF_HUB_CACHE=DIR/hub CNC_FILES_DIR=DIR/files on every node. "
                                   "Default: the Hugging Face cache and $CNC_CACHE/files."),
    base_url: str = typer.Option(None, "--base-url", help="Base URL of the published checkpoint files (a mirror); "
                                 "default: $CNC_DOWNLOAD_BASE_URL or the publisher's."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Fetch every model a config names (hub ids and the SAM checkpoint; sha256 checked, partial downloads resume)."""
    refs = _refs(configs)  # a bad config is a UserError: exit 2, one line (cnc.cli)
    failed = 0
    for ref in refs:
        try:
            path = download_ref(ref, cache_dir, base_url, progress)
        except DownloadError as exc:
            failed += 1
            typer.echo(f"error: {ref.key} '{ref.model_id}': {exc}", err=True)
            continue
        where = "built locally on first use" if ref.model_id == TINY else str(path)
        typer.echo(f"ok  {ref.key:40s} {ref.model_id}  {where}")
    if failed:
        typer.echo(f"{failed} of {len(refs)} model(s) not downloaded; rerun to resume", err=True)
        raise typer.Exit(1)


@models_app.command("list")
def list_models(
    configs: list[str] = typer.Option(None, "--config", "-c", help="Build/train config file or shipped name "
                                      "(repeatable; default: build/default and train/local)."),
) -> None:
    """Show each model of the config(s): present or missing, where, and its size (no network)."""
    refs = _refs(configs)  # a bad config is a UserError: exit 2, one line (cnc.cli)
    typer.echo(f"{'key':40s} {'model':52s} {'state':8s} {'size':>9s}  where")
    for ref in refs:
        state, path = locate(ref)
        size = _size(path) if path is not None else None
        if state == "missing" and ref.is_file and known_file(ref.model_id):
            size = known_file(ref.model_id).size
        where = str(path) if path else ("cnc models download" if state == "missing" else "cnc cache (on first use)")
        typer.echo(f"{ref.key:40s} {ref.model_id:52s} {state:8s} {_human(size):>9s}  {where}")


@config_app.command("show")
def show(name: str = typer.Argument(..., help="Shipped config (default, tiny, build/tiny, train/local...) or a "
                                                "file.")) -> None:
    """Print a config, e.g. `cnc config show train/local > my.yaml` to start a custom copy."""
    path = resolve_config_path(name, "build")  # an unknown name is a UserError: exit 2, one line (cnc.cli)
    typer.echo(path.read_text(), nl=False)


ConfigKind = choice_enum("ConfigKind", ("build", "train", "all"))


@config_app.command("docs")
def docs(
    kind: ConfigKind = typer.Option("all", "--kind", help="Which config: build, train or all."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the Markdown to this file (e.g. docs/config.md) "
                                "instead of stdout.", show_default=False),
) -> None:
    """Every config key with its type, default and description, from the pydantic models (Markdown)."""
    kind = getattr(kind, "value", kind)
    text = render_markdown(None if kind == "all" else [kind])
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}")


@config_app.command("list")
def list_configs() -> None:
    """Names of the shipped configs."""
    for name in packaged_config_names():
        typer.echo(name)


def register(app: typer.Typer) -> None:
    """Add ``cnc models`` and ``cnc config`` to the root app."""
    app.add_typer(models_app, name="models")
    app.add_typer(config_app, name="config")


__all__ = ["config_models", "download_ref", "locate", "register"]

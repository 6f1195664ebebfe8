"""The single ``cnc`` entry point lists every sub-command and rejects bad configs in one line."""

import subprocess
import sys

import pytest

from cnc.config import ConfigError, apply_overrides, load_config
from triplets.config import BuildConfig

COMMANDS = ("build", "filter", "score", "inspect", "train", "sample", "export", "eval", "convert-reference", "push", "submit",
            "jobs", "render-job", "models", "config")


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for cmd in COMMANDS:
        assert cmd in proc.stdout, f"{cmd} missing from cnc --help"


def test_overrides_are_typed_and_unknown_keys_refused():
    cfg = load_config(BuildConfig, "configs/build/tiny.yaml",
                      ["samples_per_shard=7", "inpaint.paste_back=false", "inpaint.prompt=a: b"])
    assert cfg.samples_per_shard == 7 and cfg.inpaint.paste_back is False and cfg.inpaint.prompt == "a: b"
    with pytest.raises(ConfigError, match="inpaint.promt"):
        load_config(BuildConfig, "configs/build/tiny.yaml", ["inpaint.promt=x"])
    with pytest.raises(ConfigError, match="samples_per_shard"):
        load_config(BuildConfig, None, ["samples_per_shard=0"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_default_and_tiny_configs_differ_only_in_models_and_speed_settings():
    default = load_config(BuildConfig, "configs/build/default.yaml").model_dump()
    tiny = load_config(BuildConfig, "configs/build/tiny.yaml").model_dump()
    diff = {k for k in default if default[k] != tiny[k]}
    assert diff <= {"resolution", "min_side", "segment", "inpaint", "depth", "embed"}
    assert tiny["inpaint"] | {"model": None} == default["inpaint"] | {"model": None}
    assert all(tiny[s]["model"] == "tiny" for s in ("inpaint", "depth", "embed"))


def test_a_url_given_to_a_local_path_option_is_refused_not_made_a_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cnc.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path), "--n", "1", "--output", "s3://bucket/report"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: output takes a local path, and 's3:/bucket/report' is a URL (for a local folder whose name has a colon, "
        "write ./s3:/bucket/report)"]
    assert not list(tmp_path.iterdir())

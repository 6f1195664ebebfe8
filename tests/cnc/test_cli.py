"""The single ``cnc`` entry point lists every sub-command and rejects bad configs in one line."""

import subprocess
import sys

import pytest

from cnc.config import ConfigError, apply_overrides, load_config
from triplets.config import BuildConfig

COMMANDS = ("build", "inspect", "train", "sample", "export", "eval", "convert-reference", "submit", "jobs", "render-job")


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


# -- one error path ---------------------------------------------------------------------------------------------------
def test_no_command_prints_its_own_error_line_or_exits_2():
    """Every command raises UserError; only the wrapper of cnc.cli turns it into ``error: ...`` lines and exit 2."""
    import ast

    from tests.support import REPO

    offenders = []
    for pkg in ("cnc", "triplets", "pipelines", "cnc_model", "jobs"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in ("cnc/cli.py", "cnc/commands.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef) and node.name == "_fail":
                    offenders.append(f"{rel}: def _fail")
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("Exit") and any(
                        ast.unparse(a) == "2" for a in [*node.args, *(k.value for k in node.keywords)]):
                    offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


@pytest.mark.parametrize("args,line", [
    (["sample", "ckpt"], "error: give --fg and --bg photos, or --shard-sample TAR#KEY"),
    (["sample", "ckpt", "--fg", "{tmp}/no.png", "--bg", "{tmp}/no.png"], "error: image not found: {tmp}/no.png"),
    (["sample", "ckpt", "--shard-sample", "x.tar"], "error: --shard-sample takes TAR#KEY, got 'x.tar'"),
    (["sample", "ckpt", "--shard-sample", "{tmp}/x.tar#k"], "error: shard not found: {tmp}/x.tar"),
    (["export", "{tmp}/none", "-o", "{tmp}/o"], "error: {tmp}/none does not exist"),
    (["eval", "p", "--shards", "s", "-o", "{tmp}/o", "--seeds", "a"],
     "error: --seeds takes integers like 0,1,2 or 0-3, got 'a'"),
    (["eval", "p", "--shards", "s", "-o", "{tmp}/o", "--seeds", ","], "error: --seeds is empty"),
    (["eval", "p", "--shards", "s", "-o", "{tmp}/o", "--compare-weights", "raw"],
     "error: --compare-weights needs --compare"),
    (["eval", "{tmp}/none", "--shards", "s", "-o", "{tmp}/o"], "error: PIPELINE {tmp}/none does not exist"),
    (["submit", "build", "--config", "configs/build/tiny.yaml", "--input", "/i", "--output", "/o", "--env", "BAD",
      "--dry-run"], "error: --env 'BAD' must look like KEY=VALUE"),
    (["render-job", "slurm", "build", "--config", "configs/build/tiny.yaml", "--input", "/i", "--output",
      "/o/job.sbatch"], "error: --output/-o is the job's output location, not the file to write ('/o/job.sbatch'): "
                        "use --output-file /o/job.sbatch"),
])
def test_user_errors_of_every_area_are_one_line_and_exit_2(args, line, tmp_path):
    """The messages of the former private ``_fail`` helpers (cnc_model, its eval CLI, jobs), now UserErrors: the
    same one line, the same exit status."""
    from typer.testing import CliRunner

    from cnc.cli import app

    result = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    assert [ln for ln in result.output.splitlines() if ln.strip()] == [line.replace("{tmp}", str(tmp_path))]

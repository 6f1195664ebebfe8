"""``cnc config docs`` / docs/config.md: every config key, with its type, default and description, current."""

from __future__ import annotations

from cnc.config_docs import config_keys, config_models, render_markdown
from tests.support import REPO


def _leaf_keys(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        tp = field.annotation
        args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
        sub = tp if isinstance(tp, type) and issubclass(tp, BaseModel) else (
            args[0] if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel) else None)
        if sub is not None:
            yield from _leaf_keys(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_docs_config_md_lists_every_key_and_is_current():
    page = (REPO / "docs" / "config.md").read_text()
    assert page == render_markdown(), "docs/config.md is stale: run `cnc config docs --output docs/config.md`"
    for kind, model in config_models().items():
        keys = list(_leaf_keys(model))
        assert [k.key for k in config_keys(model)] == keys, kind
        for k in keys:
            assert f"| `{k}` |" in page, f"{kind}: {k} missing from docs/config.md"
        undocumented = [k.key for k in config_keys(model) if not k.description]
        assert not undocumented, f"{kind} keys without a description: {undocumented}"


def test_types_and_defaults_read_from_the_models():
    from cnc_model.training.config import TrainConfig
    from triplets.config import BuildConfig

    build = {k.key: k for k in config_keys(BuildConfig)}
    assert build["input_format"].type == "auto | folder | coco | webdataset | pickapic | table"
    assert build["input_format"].default == '"auto"' and build["max_pixels"].default == "64000000"
    assert build["max_failure_fraction"].type == "float"
    train = {k.key: k for k in config_keys(TrainConfig)}
    assert train["stage"].default == "(required)"
    assert train["model.revision"].type == "str or null" and train["model.revision"].default == "null"
    assert train["data.depth_channels"].default == "3"
    assert "bicubic" in train["model.soft_guidance_resize"].description


def test_cnc_config_docs_command(tmp_path):
    from typer.testing import CliRunner

    from cnc.cli import app

    r = CliRunner().invoke(app, ["config", "docs", "--kind", "build"])
    assert r.exit_code == 0 and "| `segment.backend` |" in r.output and "| `train.use_ema` |" not in r.output
    r = CliRunner().invoke(app, ["config", "docs", "-o", str(tmp_path / "c.md")])
    assert r.exit_code == 0 and (tmp_path / "c.md").read_text() == render_markdown()

"""`--where` conditions and `data.filter`: undefined scores and other quality versions are the user's call."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from triplets.quality import QUALITY_VERSION, SCORES
from triplets.quality_filter import (
    FilterConfig,
    FilterSpecError,
    QualityFilter,
    QualityVersionError,
    parse_where,
    recommended_conditions,
)


def _meta(version: int = QUALITY_VERSION, **removal) -> dict:
    return {"key": "k", "quality": {"version": version, "removal": {"score": 0.4, "clip_sim": 0.9, **removal},
                                    "depth": {"order": 0.8, "margin": None}, "mask": {"components": 3}}}


def test_where_conditions_parse_and_hold():
    meta = _meta()
    assert parse_where("removal>=0.3").holds(meta) and not parse_where("removal >= 0.5").holds(meta)
    assert parse_where("depth_margin>-1").holds(meta) is None  # undefined: neither true nor false
    for bad in ("removal=>1", "nosuch>=1", "removal>=abc", "removal_residual<=0.5"):
        with pytest.raises(FilterSpecError):
            parse_where(bad)


def test_undefined_and_unscored_samples_follow_keep_unscored():
    meta = _meta()
    keep = QualityFilter([parse_where("depth_margin>=0"), parse_where("removal>=0.3")], keep_unscored=True)
    drop = QualityFilter(keep.conditions, keep_unscored=False)
    assert keep.reason(meta) is None and drop.reason(meta) == "depth_margin undefined"
    assert keep.reason({"key": "old"}) is None and drop.reason({"key": "old"}) == "unscored"
    # a defined score below the threshold drops whatever keep_unscored says
    assert keep.reason(_meta(score=0.1)) == "removal>=0.3"
    assert QualityFilter([parse_where("removal>=0.3")], keep_unscored=False).reason(_meta(score=0.1)) == "removal>=0.3"


def test_other_quality_versions_are_refused_unless_allowed_then_unscored():
    old = _meta(version=1)
    refusing = QualityFilter([parse_where("removal>=0.3")], keep_unscored=False, refuse_other_versions=True)
    with pytest.raises(QualityVersionError, match="version 1.*cnc score.*--allow-version-mix"):
        refusing.reason(old)
    assert refusing.reason(_meta()) is None  # the current version passes the same filter
    allowed = QualityFilter(refusing.conditions, keep_unscored=False)
    assert allowed.reason(old) == "quality v1"  # never judged by the new meaning of `removal`
    assert QualityFilter(refusing.conditions, keep_unscored=True).reason(old) is None


def test_filter_config_thresholds_and_the_retired_residual_key():
    qf = FilterConfig(min_removal=0.3, max_mask_components=2).build()
    assert [str(c) for c in qf.conditions] == ["removal>=0.3", "mask_components<=2"]
    assert qf.reason(_meta()) == "mask_components<=2"
    assert not FilterConfig().build()  # nothing configured: no filter
    assert FilterConfig(max_removal_contrast=0.4).build().reason(_meta(contrast=0.2)) is None
    with pytest.raises(ValidationError, match="removed in quality version 2"):
        FilterConfig(max_removal_residual=0.5)


def test_recommended_conditions_are_the_shipped_thresholds():
    got = {c.score: c for c in recommended_conditions()}
    assert set(got) == {"removal", "depth_order"}
    for name, c in got.items():
        assert (c.op, c.value) == (">=", SCORES[name].threshold)


def test_documented_defaults_name_the_shipped_thresholds():
    """`cnc filter --recommended`'s help and data.filter's descriptions quote the thresholds SCORES ships."""
    import inspect

    from pipelines.cli import filter_build

    text = inspect.signature(filter_build).parameters["recommended"].default.help
    for c in recommended_conditions():
        assert f"{c}" in text
        field = {"removal": "min_removal", "depth_order": "min_depth_order"}[c.score]
        assert f"shipped threshold {c.value:g}" in FilterConfig.model_fields[field].description

"""Quality end to end: tiny build with scores → `cnc filter` → train; shards scored by quality version 1 → load,
`cnc filter` refuses them unless told, `cnc score` rescores them to the current version, `cnc inspect` histograms
and worst-k sheets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnc.base.location import resolve
from pipelines.derive import run_filter
from tests.support import REPO
from triplets.quality import QUALITY_VERSION, score_value
from triplets.quality_filter import FilterSpecError, QualityFilter, parse_where
from triplets.shardio import iter_raw_samples, iter_samples, write_shard
from triplets.shardio.names import marker_name


def _cnc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnc.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def _raw_by_key(spec) -> dict[str, dict]:
    return {r["__key__"]: r for r in iter_raw_samples(str(spec))}


@pytest.fixture(scope="module")
def filtered(tiny_shards, tmp_path_factory):
    """`cnc filter` of the session's tiny build at the median removal score (some kept, some dropped)."""
    src = _raw_by_key(tiny_shards)
    values = {k: score_value(json.loads(r["json"]), "removal") for k, r in src.items()}
    assert None not in values.values()  # every sample of a new build carries its scores
    threshold = float(np.median(sorted(values.values())))
    kept = {k for k, v in values.items() if v >= threshold}
    assert 0 < len(kept) < len(src)
    out = tmp_path_factory.mktemp("filtered") / "out"
    proc = _cnc("filter", str(tiny_shards), "--output", str(out), "--where", f"removal>={threshold}")
    assert proc.returncode == 0, proc.stderr
    return out, src, kept, threshold


def test_filter_writes_a_committed_copy_with_kept_samples_byte_for_byte(filtered, tiny_shards):
    out, src, kept, threshold = filtered
    got = _raw_by_key(out)
    assert set(got) == kept
    for key, raw in got.items():
        assert {k: v for k, v in raw.items() if not k.startswith("__")} == \
               {k: v for k, v in src[key].items() if not k.startswith("__")}
    markers = [json.loads((out / "_cnc" / marker_name(s)).read_text()) for s in (0, 1)]
    assert sum(m["nsamples"] for m in markers) == len(kept)
    assert sum(m["ndropped"] for m in markers) == len(src) - len(kept)
    assert {r for m in markers for r in m["dropped_by_reason"]} == {f"removal>={threshold:g}"}
    manifest = json.loads((out / "_cnc" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == len(kept) and manifest["operation"]["op"] == "filter"
    # a rerun resumes: nothing rewritten; another condition in the same folder is refused
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run_filter(str(tiny_shards), str(out), [f"removal>={threshold}"])
    assert (again.shards_built, again.shards_skipped, again.samples) == (0, 2, len(kept))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    proc = _cnc("filter", str(tiny_shards), "--output", str(out), "--where", "removal>=0.99")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "different config" in proc.stderr
    with pytest.raises(FilterSpecError, match="unknown score"):
        run_filter(str(tiny_shards), str(out.parent / "x"), ["removel>=1"])


def test_training_on_the_filtered_build_and_with_data_filter(filtered, tiny_shards, tmp_path):
    from cnc_model.training import Trainer, load_train_config

    out, src, kept, threshold = filtered
    common = ["model.pretrained_model_name_or_path=tiny", "data.resolution=64", "data.num_workers=0",
              "data.shuffle_buffer=0", "train.mixed_precision=no", "train.gradient_checkpointing=false",
              "train.report_to=none", "train.progress_bar=false", "train.train_batch_size=1",
              "validation.num_samples=0", "train.max_train_steps=2", "train.record_keys=true",
              "data.preflight_shards=1"]
    result = Trainer(load_train_config(REPO / "configs/train/local.yaml", common + [
        f"data.train_shards={out}", f"output_dir={tmp_path / 'a'}"])).train()
    assert result.global_step == 2 and not result.filtered
    seen = (tmp_path / "a" / "keys" / "rank-0.txt").read_text().split()
    assert seen and set(seen) <= kept
    # the same thresholds as data.filter while streaming the unfiltered build: no dropped sample is trained on
    result = Trainer(load_train_config(REPO / "configs/train/local.yaml", common + [
        f"data.train_shards={tiny_shards}", f"output_dir={tmp_path / 'b'}",
        f"data.filter.min_removal={threshold}", "train.max_train_steps=4"])).train()
    seen = (tmp_path / "b" / "keys" / "rank-0.txt").read_text().split()
    assert result.global_step == 4 and set(seen) <= kept
    assert set(result.filtered) <= {f"removal>={threshold:g}"}


def test_undefined_scores_are_kept_or_dropped_as_the_user_says(tiny_shards, tmp_path):
    """The tiny models' D(I) and D(I_b) do not align (random weights): depth_order is undefined on every sample,
    never silently another score; --keep-unscored / --drop-unscored decide."""
    src = _raw_by_key(tiny_shards)
    assert all(score_value(json.loads(r["json"]), "depth_order") is None for r in src.values())
    kept = run_filter(str(tiny_shards), str(tmp_path / "keep"), ["depth_order>=0.5"], keep_unscored=True)
    dropped = run_filter(str(tiny_shards), str(tmp_path / "drop"), ["depth_order>=0.5"], keep_unscored=False)
    assert (kept.samples, kept.dropped) == (len(src), {})
    assert (dropped.samples, dropped.dropped) == (0, {"depth_order undefined": len(src)})


V1_QUALITY = {"version": 1, "removal": {"changed": 1.0, "residual": None, "clip_sim": 0.5, "score": 1.0},
              "depth": {"order": 1.0, "margin": 0.4}, "mask": {"area": 0.5, "components": 1, "border": 0.0,
                                                             "bbox_fill": 0.6}}


@pytest.fixture(scope="module")
def old_shards(tiny_shards, tmp_path_factory):
    """The tiny build as shards scored by quality version 1 (whose removal score and depth order meant something
    else, e.g. 1.0 for an object regenerated in place)."""
    old = tmp_path_factory.mktemp("old")
    for shard, tar in enumerate(sorted(Path(tiny_shards).glob("*.tar"))):
        samples = list(iter_samples(str(tar)))
        for s in samples:
            s.meta["quality"] = dict(V1_QUALITY)
        stats = write_shard(old / tar.name, samples)
        resolve(old / marker_name(shard)).write_json(stats)
    return old


def test_old_shards_load_as_unscored_and_cnc_filter_refuses_to_mix_versions(old_shards, tmp_path):
    from cnc_model.data import make_dataloader

    keys = set(_raw_by_key(old_shards))
    qf = QualityFilter([parse_where("removal>=0.5")])  # the trainer's data.filter, keep_unscored by default
    loader = make_dataloader(str(old_shards), batch_size=1, shuffle_buffer=0, epoch_samples=len(keys),
                             quality_filter=qf)
    it = iter(loader)
    seen = {next(it)["keys"][0] for _ in range(len(keys))}
    assert seen == keys and not loader.filtered and "filtered" in loader.state_dict()
    # version-1 numbers are never judged by version-2 meanings: refused before anything is written...
    out = tmp_path / "f"
    proc = _cnc("filter", str(old_shards), "--output", str(out), "--recommended")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "quality version 1" in proc.stderr and "cnc score" in proc.stderr and not list(out.glob("*.tar"))
    # ...unless told, and then they are unscored: --drop-unscored drops them by version
    result = run_filter(str(old_shards), str(out), ["removal>=0.5"], allow_version_mix=True)
    assert result.samples == 0 and result.dropped == {"quality v1": len(keys)}


def test_score_rescores_version_1_shards_and_inspect_shows_it(old_shards, tiny_shards, tmp_path):
    from triplets.inspect import inspect_shards, write_report

    before = inspect_shards(str(old_shards), n=0, worst=2)
    assert before.summary.unscored == 6 and not before.worst  # version-1 scores are not shown as current ones
    out = tmp_path / "scored"
    proc = _cnc("score", str(old_shards), "--output", str(out), "--config", "configs/build/tiny.yaml",
                "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    old, new, built = _raw_by_key(old_shards), _raw_by_key(out), _raw_by_key(tiny_shards)
    assert set(new) == set(old)
    for key, raw in new.items():
        assert {k: v for k, v in raw.items() if k not in ("json", "__url__", "__local_path__")} == \
               {k: v for k, v in old[key].items() if k not in ("json", "__url__", "__local_path__")}
        q, ref = json.loads(raw["json"])["quality"], json.loads(built[key]["json"])["quality"]
        assert q["version"] == QUALITY_VERSION and q["mask"] == ref["mask"]  # lossless fields: the build's values
        assert abs(q["removal"]["score"] - ref["removal"]["score"]) < 0.15  # from JPEG-decoded I and I_b
    operation = json.loads((out / "_cnc" / "manifest.json").read_text())["operation"]
    assert operation["op"] == "score" and operation["quality_version"] == QUALITY_VERSION
    result = inspect_shards(str(out), n=0, worst=2)
    assert result.validation.ok and result.summary.unscored == 0
    assert result.summary.quality["removal"].stats.n == 6
    assert sum(result.summary.quality["mask_area"].hist.counts) == 6
    worst = result.worst["removal"]
    assert len(worst) == 2 and worst[0][0] <= worst[1][0]
    assert worst[0][0] == min(score_value(json.loads(r["json"]), "removal") for r in new.values())
    files = write_report(result, tmp_path / "report", html=True)
    assert (tmp_path / "report" / "worst_removal.png") in files.worst
    page = files.html.read_text()
    assert "aria-label='removal'" in page and "<section id='worst'>" in page  # a histogram per score, the worst
    assert re.search(r"<span class='bad'>[^<]*removal \d", page)  # samples with the scores they are worst in
    summary = json.loads(files.summary_json.read_text())
    assert summary["summary"]["quality"]["removal"]["stats"]["n"] == 6
    proc = _cnc("inspect", str(out), "--n", "0", "--worst", "1", "--output", str(tmp_path / "cli"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Quality scores" in proc.stdout and "removal" in proc.stdout
    assert (tmp_path / "cli" / "worst_removal.png").is_file()
    # and the rescored copy filters without complaint
    again = run_filter(str(out), str(tmp_path / "f2"), [], recommended=True)
    assert again.samples + sum(again.dropped.values()) == 6


def test_filter_on_object_storage_resumes_after_a_crash_exactly_once(filtered, tiny_shards):
    """A shard that dies mid-way leaves nothing behind; the rerun commits it once; bytes equal the local copy."""
    from pipelines.derive import derive_build, filter_transform
    from triplets.shardio import resolve_shards

    local, _, kept, threshold = filtered
    qf = QualityFilter([parse_where(f"removal>={threshold}")])
    operation = {"op": "filter", "where": [f"removal>={threshold:g}"], "keep_unscored": False}
    url = "memory://cnc-quality-test/filtered"

    calls = []

    def crashing(raws, counts, failures):  # shard 0 completes; shard 1 dies after its first kept sample
        calls.append(1)
        for raw in filter_transform(qf)(raws, counts, failures):
            yield raw
            if len(calls) == 2:
                raise RuntimeError("worker died")
        if len(calls) == 2:
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        derive_build(str(tiny_shards), url, operation, crashing)
    committed = resolve_shards(url, committed_only=True)
    assert [u.rsplit("/", 1)[-1] for u in committed] == ["000000.tar"]  # the shard that died is not visible
    result = derive_build(str(tiny_shards), url, operation, filter_transform(qf))
    assert (result.shards_built, result.shards_skipped, result.samples) == (1, 1, len(kept))
    remote = {u.rsplit("/", 1)[-1]: resolve(u).read_bytes() for u in resolve_shards(url, committed_only=True)}
    assert remote == {p.name: p.read_bytes() for p in sorted(local.glob("*.tar"))}


def test_a_filter_that_drops_everything_stops_the_loader_with_one_message(tiny_shards):
    from cnc_model.data import TrainingDataError, make_dataloader
    from triplets.shardio import TarStream

    loader = make_dataloader(str(tiny_shards), batch_size=1, shuffle_buffer=0,
                             quality_filter=QualityFilter([parse_where("removal>1")]))
    n = sum(1 for tar in tiny_shards.glob("*.tar") for _ in TarStream(str(tar)).keys())
    # each sample counted once, not once per pass the loader made before giving up (issue 26.8: 37 of 10)
    with pytest.raises(TrainingDataError, match=rf"no usable sample in a whole pass over 2 shard\(s\): all {n} "
                                                rf"samples were dropped \(data.filter: {{'removal>1': {n}}}; "
                                                rf"0 did not decode\)"):
        next(iter(loader))

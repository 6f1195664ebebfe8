"""`cnc inspect` on generated shards: validation findings and exit codes, summary, contact sheets, HTML."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnc.cli import app
from tests import support
from triplets.inspect import (
    SheetLayout,
    Summary,
    colorize,
    contact_sheet,
    depth_margin,
    inspect_shards,
    summarise,
    validate,
)
from triplets.sample import TripletSample, encode_sample
from triplets.shardio import resolve_shards, write_shard

R = 32


def make_sample(key: str, seed: int = 0, nearer: bool = True, caption: str = "a disk on random noise") -> TripletSample:
    """A well-formed sample (the shared factory): a disk mask, fg disparity peaking inside it (or not)."""
    return support.make_sample(key, seed, size=R, nearer=nearer, caption=caption,
                               meta={"models": {"depth.model": "tiny"}})


def write_build(out, shards: list[list[TripletSample]], failures: dict[int, list[dict]] | None = None,
                seconds: float = 2.0) -> None:
    """A build output folder: NNNNNN.tar + NNNNNN_stats.json + errors/NNNNNN.jsonl + plan.json."""
    (out / "errors").mkdir(parents=True, exist_ok=True)
    for i, samples in enumerate(shards):
        info = write_shard(out / f"{i:06d}.tar", samples)
        rows = (failures or {}).get(i, [])
        (out / "errors" / f"{i:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        marker = {**info, "seconds": seconds, "failures": {}, "stage_seconds": {"segment": 0.5, "inpaint": 1.5}}
        (out / f"{i:06d}_stats.json").write_text(json.dumps(marker))
    (out / "plan.json").write_text(json.dumps({"shards": [[] for _ in shards]}))


def raw_tar(path, raws: list[dict]) -> None:
    """Write raw sample dicts to a tar without the encoder's checks (to build broken shards)."""
    with tarfile.open(path, "w") as tf:
        for raw in raws:
            for suffix, data in raw.items():
                if suffix == "__key__":
                    continue
                info = tarfile.TarInfo(f"{raw['__key__']}.{suffix}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def build(tmp_path):
    out = tmp_path / "build"
    shards = [[make_sample(f"a/{i:03d}", i) for i in range(5)],
              [make_sample(f"b/{i:03d}", 10 + i, nearer=i != 0) for i in range(4)]]
    failures = {0: [{"key": "a/bad", "source": "/x/bad.jpg", "stage": "decode", "reason": "empty file (0 bytes)"}],
                1: [{"key": "b/s1", "source": "/x/s1.jpg", "stage": "decode",
                     "reason": "image too small: short side 20 px < min_side 64"},
                    {"key": "b/s2", "source": "/x/s2.jpg", "stage": "decode",
                     "reason": "image too small: short side 31 px < min_side 64"}]}
    write_build(out, shards, failures)
    return out


def run_cli(*args):
    result = CliRunner().invoke(app, ["inspect", *map(str, args)])
    return result, result.output


def test_valid_build_summary_and_exit_zero(build, tmp_path):
    res, out = run_cli(build, "--output", tmp_path / "rep", "--n", "4")
    assert res.exit_code == 0, out
    assert "ERROR" not in out and "samples" in out and "Failures by reason" in out
    s = summarise(build)
    assert (s.shards, s.samples, s.failed) == (2, 9, 3)
    assert s.failures == {"decode: empty file (N bytes)": 1, "decode: image too small": 2}
    assert s.depth_order.n == 9 and s.depth_order.fg_nearer == 8  # b/000 has the background nearer
    assert s.mask_area_stats.n == 9 and sum(s.mask_area.counts) == 9
    assert s.caption_words.mean == 5
    assert s.throughput.samples == 9 and s.throughput.samples_per_second == pytest.approx(9 / 4)
    assert s.throughput.stage_seconds == {"segment": 1.0, "inpaint": 3.0}
    data = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert data["ok"] and data["samples"] == 9 and len(data["shown"]) == 4
    assert (tmp_path / "rep" / "contact_sheet_000.png").is_file()


def test_depth_margin_sign():
    assert depth_margin(make_sample("k", nearer=True)) > 0
    assert depth_margin(make_sample("k", nearer=False)) < 0
    empty = make_sample("k")
    empty.mask[:] = 0
    assert depth_margin(empty) is None


def test_truncated_tar_names_file_and_offset(build):
    tar = build / "000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])  # inside a member
    res, out = run_cli(build, "--n", "0")
    assert res.exit_code == 1
    line = next(ln for ln in out.splitlines() if "000001.tar" in ln and "truncated" in ln)
    assert "ends at byte" in line and str(len(data) // 2 + 100) in line


def test_tar_cut_on_a_block_boundary_is_truncated(build):
    """tarfile accepts a tar cut between members; the missing end-of-archive marker gives it away."""
    tar = build / "000000.tar"
    names = tarfile.open(tar).getmembers()
    cut = names[9].offset  # header of the second sample's first member
    tar.write_bytes(tar.read_bytes()[:cut])
    result = validate(build)
    assert not result.ok
    msgs = [str(p) for p in result.errors]
    assert any("000000.tar" in m and "truncated" in m and f"byte {cut}" in m for m in msgs), msgs


def test_missing_field_is_reported(tmp_path):
    raws = [encode_sample(make_sample(f"k{i}", i)) for i in range(3)]
    del raws[1]["bg_depth.png"]
    raw_tar(tmp_path / "000000.tar", raws)
    res, out = run_cli(tmp_path / "000000.tar", "--n", "0")
    assert res.exit_code == 1
    assert any("[k1]" in ln and "bg_depth.png" in ln and ln.startswith("ERROR") for ln in out.splitlines()), out


def test_wrong_dtype_is_reported(tmp_path):
    raw = encode_sample(make_sample("k0"))
    from triplets.image_io import encode_png
    raw["fg_depth.png"] = encode_png(np.zeros((R, R), np.uint8))  # 8-bit instead of 16-bit
    raw_tar(tmp_path / "x.tar", [raw])
    result = validate(tmp_path / "x.tar")
    assert not result.ok and "fg_depth.png" in str(result.errors[0])


def test_duplicate_keys_across_shards(tmp_path):
    write_shard(tmp_path / "000000.tar", [make_sample("k/a"), make_sample("k/b")])
    write_shard(tmp_path / "000001.tar", [make_sample("k/c"), make_sample("k/a", 3)])
    res, out = run_cli(tmp_path / "*.tar", "--n", "0")
    assert res.exit_code == 1
    dup = [ln for ln in out.splitlines() if "duplicate key" in ln]
    assert len(dup) == 1 and "[k/a]" in dup[0] and "000000.tar" in dup[0] and "000001.tar" in dup[0]


def test_stats_marker_disagreement(build):
    m0 = json.loads((build / "000000_stats.json").read_text())
    (build / "000000_stats.json").write_text(json.dumps({**m0, "sha256": "0" * 64}))
    m1 = json.loads((build / "000001_stats.json").read_text())
    (build / "000001_stats.json").write_text(json.dumps({**{k: v for k, v in m1.items() if k != "nsamples"},
                                                         "count": 7}))
    res, out = run_cli(build, "--n", "0")
    assert res.exit_code == 1
    assert any("000000.tar" in ln and "sha256" in ln for ln in out.splitlines())
    assert any("000001.tar" in ln and "says 7 samples" in ln and "holds 4" in ln for ln in out.splitlines())


def test_orphan_marker_and_unfinished_shard(build):
    (build / "000001.tar").unlink()
    (build / "000000_stats.json").unlink()
    result = validate(build)
    msgs = [str(p) for p in result.problems]
    assert any("000001_stats.json has no 000001.tar" in m for m in msgs)
    assert any(m.startswith("WARNING") and "no stats marker" in m for m in msgs)
    assert any(m.startswith("WARNING") and "plan.json lists 2 shards, 1 present" in m for m in msgs)
    assert not result.ok


def test_failures_fall_back_to_the_marker(build):
    (build / "errors" / "000001.jsonl").unlink()
    m = json.loads((build / "000001_stats.json").read_text())
    m["failures_by_reason"] = {"image too small: short side 9 px < min_side 64": 4}
    (build / "000001_stats.json").write_text(json.dumps(m))
    assert summarise(build).failures == {"decode: empty file (N bytes)": 1, "?: image too small": 4}


def test_max_shards_reads_only_the_first(build):
    result = validate(build, max_shards=1)
    assert result.ok and len(result.shards) == 1 and result.nsamples == 5


def test_no_decode_mode_and_workers_agree(build):
    fast = validate(build, decode=False)
    assert fast.ok and fast.nsamples == 9
    a = inspect_shards(build, n=3, seed=7)
    b = inspect_shards(build, n=3, seed=7, workers=2)
    assert [s.key for s in a.samples] == [s.key for s in b.samples]
    assert a.summary.to_dict() == b.summary.to_dict()


def test_seeded_choice_and_keys(build):
    pick = lambda seed: [s.key for s in inspect_shards(build, n=4, seed=seed).samples]  # noqa: E731
    assert pick(1) == pick(1) and len(pick(1)) == 4
    assert pick(1) != pick(2) or pick(1) != pick(3)
    res = inspect_shards(build, keys=["b/002", "a/001", "nope"])
    assert [s.key for s in res.samples] == ["a/001", "b/002"] and res.missing_keys == ["nope"]
    r, out = run_cli(build, "--keys", "a/001,nope", "--output", build / "rep")
    assert r.exit_code == 2


def test_contact_sheet_size_and_rows():
    samples = [make_sample(f"k{i}", i) for i in range(3)]
    layout = SheetLayout(tile=48)
    sheet = contact_sheet(samples, layout=layout)
    assert sheet.size == layout.size(3) == (2 * 8 + 6 * 48 + 5 * 4, layout.height(3))
    arr = np.asarray(sheet)
    for r, s in enumerate(samples):  # each row starts with its own image, resized to the tile
        x, y = layout.tile_origin(r, 0)
        expect = np.asarray(Image.fromarray(s.image).resize((48, 48), Image.BILINEAR))
        assert np.array_equal(arr[y:y + 48, x:x + 48], expect)
        x, y = layout.tile_origin(r, 3)  # I_b column
        expect = np.asarray(Image.fromarray(s.background).resize((48, 48), Image.BILINEAR))
        assert np.array_equal(arr[y:y + 48, x:x + 48], expect)
    y_after = layout.tile_origin(2, 0)[1] + layout.row_height
    assert y_after <= sheet.size[1] - layout.footer - layout.margin  # three rows, then the scale bar
    assert contact_sheet(samples[:1]).size == SheetLayout(tile=96).size(1)  # small resolutions are enlarged


def test_colorize_is_viridis_like():
    ramp = colorize(np.array([[0, 65535]], np.uint16))
    assert ramp.shape == (1, 2, 3) and tuple(ramp[0, 0]) == (68, 1, 84) and tuple(ramp[0, 1]) == (253, 231, 37)
    with pytest.raises(ValueError, match="viridis"):
        colorize(np.zeros((2, 2)), cmap="jet")


def test_html_report_is_self_contained(build, tmp_path):
    res, out = run_cli(build, "--n", "3", "--seed", "1", "--html", "--output", tmp_path / "rep", "--per-page", "2")
    assert res.exit_code == 0, out
    rep = tmp_path / "rep"
    assert sorted(p.name for p in rep.glob("contact_sheet_*.png")) == ["contact_sheet_000.png", "contact_sheet_001.png"]
    page = (rep / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "src='data:image/jpeg;base64," in page
    shown = json.loads((rep / "summary.json").read_text())["shown"]
    assert len(shown) == 3 and all(k in page for k in shown)
    assert "&quot;source&quot;" in page  # the json metadata


def test_paths_globs_and_braces(build):
    assert [p.rsplit("/", 1)[1] for p in resolve_shards(str(build))] == ["000000.tar", "000001.tar"]
    assert len(resolve_shards(str(build / "*.tar"))) == 2
    assert len(resolve_shards(str(build / "{000000..000001}.tar"))) == 2
    res, _ = run_cli(build / "nothing*.tar")
    assert res.exit_code == 2


def test_summary_merge_equals_sequential():
    a, b, both = Summary(), Summary(), Summary()
    for i in range(6):
        s = make_sample(f"k{i}", i, nearer=i % 3 != 0, caption="x " * i)
        (a if i < 2 else b).add_sample(s)
        both.add_sample(s)
    a.merge(b)
    assert a.to_dict() == both.to_dict()
    assert both.empty_captions == 1 and both.depth_order.fg_nearer == 4

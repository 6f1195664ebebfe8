"""Issue 11.7: cnc inspect (and the trainer pre-flight) report odd shards as findings, never crash or hang."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from tests import support
from tests.support import synthetic_photo
from triplets.inspect import inspect_shards, validate
from triplets.inspect.render import contact_sheet
from triplets.sample import TripletSample, encode_sample, validate_sample

R = 32


def make_sample(key: str, caption: str = "a disk") -> TripletSample:
    return support.make_sample(key, size=R, caption=caption, meta={"source": f"/x/{key}.jpg"})


def _tar(path, members: list[tuple[str, bytes]], encoding: str = "utf-8") -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding=encoding) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _members(key: str, **replace) -> list[tuple[str, bytes]]:
    raw = encode_sample(make_sample(key))
    raw.update(replace)
    return [(f"{key}.{k}", v) for k, v in raw.items() if k != "__key__"]


def _messages(result) -> str:
    return "\n".join(str(p) for p in result.problems)


@pytest.mark.parametrize("decode", [True, False])
def test_json_member_that_is_an_array_is_a_finding(tmp_path, decode):
    _tar(tmp_path / "000000.tar", _members("a", json=b"[1, 2]") + _members("b"))
    result = validate(tmp_path, decode=decode)
    assert not result.ok and "not a JSON object" in _messages(result)


def test_non_utf8_member_names_are_findings(tmp_path):
    _tar(tmp_path / "000000.tar", _members("a") + [("\xe9t\xe9.jpg", b"x")], encoding="latin-1")
    result = validate(tmp_path)
    assert "not valid UTF-8" in _messages(result)
    str(result.problems[0]).encode("utf-8")  # printable


@pytest.mark.parametrize("field,value", [("fg_depth_range", "abc"), ("bg_depth_range", [0.0, float("nan")]),
                                         ("mask_area", float("nan")), ("fg_depth_range", [2.0, 1.0]),
                                         ("resolution", "32"), ("crop_box", [0, 0, 1])])
def test_nan_or_wrong_typed_meta_is_invalid(tmp_path, field, value):
    s = make_sample("a")
    raw = encode_sample(s)
    meta = json.loads(raw["json"])
    meta[field] = value
    raw["json"] = json.dumps(meta).encode()  # NaN serialises as the JSON extension NaN
    _tar(tmp_path / "000000.tar", [(f"a.{k}", v) for k, v in raw.items() if k != "__key__"])
    for decode in (True, False):
        result = validate(tmp_path, decode=decode)
        assert not result.ok and f"json: {field}" in _messages(result), (decode, _messages(result))


def test_nan_embeddings_are_invalid():
    s = make_sample("a")
    s.fg_emb[3] = np.nan
    assert any("non-finite" in p for p in validate_sample(s))


def test_caption_wrapping_is_linear(monkeypatch):
    """A 5k-character word and a >1M-character caption: few measurements of bounded text (was quadratic)."""
    from PIL import ImageDraw

    measured: list[int] = []
    real = ImageDraw.ImageDraw.textlength

    def textlength(self, text, *args, **kwargs):
        measured.append(len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "textlength", textlength)
    long_word = make_sample("a", caption="x" * 5000 + " tail")
    huge = make_sample("b", caption=("word " * 250_000) + "y" * 1_000_000)
    img = contact_sheet([long_word, huge], tile=32)
    assert img.size[0] > 0
    width = img.size[0]
    assert len(measured) < 400 and max(measured) <= width + 10, (len(measured), max(measured))


def test_fifo_named_like_a_shard_is_skipped_not_waited_on(tmp_path):
    _tar(tmp_path / "000000.tar", _members("a"))
    os.mkfifo(tmp_path / "000001.tar")
    code = ("import sys; from triplets.inspect import validate; r = validate(sys.argv[1]); "
            "print(len(r.shards), r.ok)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "True"] and "not a regular file" in proc.stderr


def test_members_over_the_size_cap_are_findings_and_not_read(tmp_path):
    _tar(tmp_path / "000000.tar", _members("a", txt=b"c" * 5000))
    result = inspect_shards(tmp_path, n=0, max_member_bytes=4096).validation
    assert "over the limit of 4096 (max_member_bytes)" in _messages(result)
    assert validate(tmp_path).ok


def test_compressed_tars_and_link_members_are_findings(tmp_path):
    """Issue 26.8: a gzip tar and link members were called valid (the links silently ignored)."""
    import gzip

    _tar(tmp_path / "plain.tar", _members("a"))
    (tmp_path / "000000.tar").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    (tmp_path / "plain.tar").unlink()
    links = tmp_path / "links"
    links.mkdir()
    with tarfile.open(links / "000000.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in _members("a"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (("b.jpg", tarfile.SYMTYPE), ("c.jpg", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.jpg"
            tf.addfile(info)
    gz = validate(tmp_path / "000000.tar")
    assert not gz.ok and "the tar is gz-compressed: shards are plain tars" in _messages(gz)
    linked = validate(links)
    assert not linked.ok
    assert "member 'b.jpg' is a symlink to 'a.jpg'" in _messages(linked)
    assert "member 'c.jpg' is a hard link to 'a.jpg'" in _messages(linked)


def test_trainer_preflight_reports_instead_of_crashing(tmp_path):
    from cnc_model.data import preflight_check

    _tar(tmp_path / "000000.tar", _members("a", json=b"[1]") + [("\xe9.jpg", b"x")])
    with pytest.raises(ValueError, match="not a JSON object"):
        preflight_check([str(tmp_path / "000000.tar")])


def test_non_utf8_error_log_is_a_finding_not_a_crash(tmp_path):
    _tar(tmp_path / "000000.tar", _members("a"))
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "000000.jsonl").write_bytes(b'{"stage": "decode", "reason": "x"}\n\xff\xfe\n[1]\n')
    result = validate(tmp_path)
    assert "line 2 is not a JSON object" in _messages(result) and "line 3" in _messages(result)


def test_inspect_accepts_latent_member():
    """``latent.npy`` is a known optional member: cnc inspect's validator does not warn about it."""
    from types import SimpleNamespace

    from triplets.inspect.validate import _check_sample
    from triplets.sample import TripletSample, encode_sample

    meta = {"key": "k", "source": "x", "original_size": [R, R], "crop_box": [0, 0, 1, 1, 1], "resolution": R,
            "seed": 0, "models": {}, "mask_area": 0.25, "fg_depth_range": [0, 1], "bg_depth_range": [0, 1],
            "timings": {}, "version": "t"}
    img = synthetic_photo(0, R, R)
    mask = np.zeros((R, R), np.uint8)
    mask[8:24, 8:24] = 1
    depth = np.zeros((R, R), np.uint16)
    s = TripletSample(key="k", image=img, mask=mask, background=img, fg_depth=depth, bg_depth=depth,
                      fg_emb=np.zeros(8, np.float32), bg_emb=np.zeros(8, np.float32), caption="", meta=meta,
                      latent=np.zeros((2, 4, R // 8, R // 8), np.float16))
    findings, summary = [], SimpleNamespace(add_sample=lambda sample: None)
    _check_sample(encode_sample(s), True, summary, lambda msg, key, *a: findings.append(msg))
    assert findings == []
    bad = encode_sample(s)
    bad["latent.npy"] = encode_sample(TripletSample(**{**s.__dict__, "latent": None}))["fg_emb.npy"]
    _check_sample(bad, True, summary, lambda msg, key, *a: findings.append(msg))
    assert findings and "latent.npy" in findings[0]

"""Issue 11: ``cnc build``, ``cnc inspect`` and ``cnc train`` on a hostile set, in fresh subprocesses.

Whole-input faults exit 2 with a one-line reason, bad items are quarantined (exit 0/1), and no output ever holds a
Python traceback.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import FAST_BUILD, REPO, TINY_CONFIG, make_photo_folder, make_sample

TRAIN_TINY = REPO / "configs" / "train" / "tiny.yaml"


def cnc(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, errors="replace", timeout=timeout)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode in (0, 1, 2), out
    return proc


def _tar(path: Path, members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _encoded_sample(key: str, r: int = 16) -> dict:
    from triplets.sample import encode_sample

    return encode_sample(make_sample(key, size=r, caption="c"))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    paths: dict[str, Path] = {}
    (root / "empty").mkdir()
    (root / "photos.tar").mkdir()
    (root / "a{1..2}").mkdir()
    jpg = (make_photo_folder(root / "one", 1, bad=()) and (root / "one" / "img_000.jpg").read_bytes())
    paths["gzip_tar"] = root / "gz.tar"
    paths["gzip_tar"].write_bytes(gzip.compress(_tar(root / "plain.tar", [("a.jpg", jpg), ("a.txt", b"x")])))
    paths["brace_missing"] = root / "shards" / "{000..002}.tar"
    _tar(root / "shards" / "000.tar", [("a.jpg", jpg)])
    (root / "annotations").mkdir()
    paths["coco_list"] = root / "annotations" / "captions_train2017.json"
    paths["coco_list"].write_text("[1, 2]")
    (root / "train2017").mkdir()
    paths["bad_yaml"] = root / "bad.yaml"
    paths["bad_yaml"].write_text("resolution: [64\nseed: 1\n")
    paths["out_file"] = root / "out_is_a_file"
    paths["out_file"].write_text("x")
    paths["foreign"] = root / "not_a_build"
    paths["foreign"].mkdir()
    (paths["foreign"] / "notes.txt").write_text("mine")
    # a folder with good images and bad items: bad caption lines, non-UTF-8 name, symlink out, 16-bit mask
    folder = root / "mixed"
    make_photo_folder(folder, 2, bad=("truncated",))
    with open(folder / "captions.jsonl", "ab") as f:
        f.write(b'[1,2]\nnull\n"x"\n{"key": "img_000", "caption": null}\n\xff\xfe\n')
    with open(os.path.join(os.fsencode(folder), b"bad\xffname.jpg"), "wb") as f:
        f.write(jpg)
    (root / "outside.jpg").write_bytes(jpg)
    (folder / "link.jpg").symlink_to(root / "outside.jpg")
    (folder / "masks").mkdir()
    h, w = np.asarray(Image.open(folder / "img_001.jpg")).shape[:2]
    mask16 = np.zeros((h, w), np.uint16)
    mask16[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 33024  # foreground only when thresholded at 16 bits
    Image.fromarray(mask16).save(folder / "masks" / "img_001.png")
    paths["mixed"] = folder
    # shards with odd members for inspect / train
    shards = root / "bad_shards"
    raw = _encoded_sample("k")
    raw["json"] = b"[1, 2]"
    deep = _encoded_sample("deep")
    deep["json"] = b"[" * 5000 + b"]" * 5000  # 10 KB nested 5000 deep (issue 26.6)
    _tar(shards / "000000.tar", [(f"k.{k}", v) for k, v in raw.items() if k != "__key__"] + [("\xe9.jpg", b"x")]
         + [(f"deep.{k}", v) for k, v in deep.items() if k != "__key__"])
    os.mkfifo(shards / "000001.tar")
    paths["bad_shards"] = shards
    return {**paths, "empty": root / "empty", "dir_tar": root / "photos.tar", "dir_brace": root / "a{1..2}",
            "root": root}


# One case per kind; the readers' and config's unit tests (tests/triplets/readers/, tests/triplets/test_config.py)
# cover the variants in-process.
@pytest.mark.parametrize("case,extra,match", [
    ("empty", [], "no usable images"),
    ("gzip_tar", [], "gzip-compressed"),
    ("coco_list", [], "not a COCO captions file"),
    ("mixed", ["--input-format", "coco"], "input_format=coco needs"),
    ("mixed", ["--set", "device=banana"], "unknown device"),
    ("mixed", ["--config", "BAD_YAML"], "not valid YAML"),
    ("mixed", ["--output", "OUT_FILE"], "existing file"),
    ("mixed", ["--output", "FOREIGN"], "is not empty and holds no plan.json"),  # and gets no .lock (26.8)
    # issue 26.5: settings that would commit garbage or could never run are refused before any work
    ("mixed", ["--set", "inpaint.guidance_scale=.inf"], "inpaint.guidance_scale"),
    ("mixed", ["--set", "inpaint.guidance_scale=.nan"], "inpaint.guidance_scale"),
    ("mixed", ["--set", "resolution=100000"], "resolution"),
])
def test_build_refuses_whole_input_faults_with_exit_2_and_one_line(hostile, tmp_path, case, extra, match):
    named = {"BAD_YAML": hostile["bad_yaml"], "OUT_FILE": hostile["out_file"], "FOREIGN": hostile["foreign"]}
    extra = [named.get(e, e) for e in extra]
    args = ["build", "--input", hostile[case]]
    if "--config" not in extra:
        args += ["--config", TINY_CONFIG]
    if "--output" not in extra:
        args += ["--output", tmp_path / "out"]
    proc = cnc(*args, *extra)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line or "error" in line]
    assert len(errors) == 1 and match in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written
    assert sorted(p.name for p in hostile["foreign"].iterdir()) == ["notes.txt"]  # left exactly as it was


def test_build_quarantines_bad_items_and_goes_on(hostile, tmp_path, ray_local):
    """The build joins the session's local Ray (127.0.0.1): a fresh Ray per subprocess costs ~30 s on 2 CPUs."""
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    args = ["build", "--config", TINY_CONFIG, "--input", hostile["mixed"], "--output", out, "--address", address]
    for item in [*FAST_BUILD, "ray.num_workers=1", "samples_per_shard=8", "max_failure_fraction=0.5"]:
        args += ["--set", item]
    proc = cnc(*args, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "captions.jsonl:6:" in log and "not valid UTF-8" in log and "links outside the input folder" in log
    manifest = json.loads((out / "_cnc" / "manifest.json").read_text())
    keys = {json.loads(line)["key"] for f in (out / "_cnc" / "errors").glob("*.jsonl") for line in f.read_text().splitlines()}
    assert keys == {"img_001_truncated"}  # the per-item reason of the one undecodable image
    assert manifest  # written
    insp = cnc("inspect", out, "--n", "0")
    assert insp.returncode == 0, insp.stdout + insp.stderr


def test_inspect_reports_odd_shards_and_never_hangs(hostile, tmp_path):
    proc = cnc("inspect", hostile["bad_shards"], "--n", "0", timeout=120)
    assert proc.returncode == 1
    assert "not a JSON object" in proc.stdout and "not valid UTF-8" in proc.stdout
    assert "[deep] does not decode: ValueError: json nests deeper than 64 levels" in proc.stdout
    assert "not a regular file" in proc.stderr
    assert cnc("inspect", hostile["root"] / "nope").returncode == 2
    assert cnc("inspect", hostile["empty"]).returncode == 2


@pytest.mark.parametrize("extra,match", [
    (["--set", f"seed={2**40}"], "seed"),
    (["--set", "output_dir=OUT_FILE"], "existing file"),
    (["--set", "data.train_shards=[BAD_SHARDS]"], "not a JSON object"),
])
def test_train_refuses_bad_config_and_data_with_exit_2(hostile, tmp_path, extra, match):
    sub = {"OUT_FILE": str(hostile["out_file"]), "BAD_SHARDS": str(hostile["bad_shards"] / "000000.tar"),
           "BAD_YAML": str(hostile["bad_yaml"])}
    extra = [next((e.replace(k, v) for k, v in sub.items() if k in e), e) for e in extra]
    args = ["train"]
    if "--config" not in extra:
        args += ["--config", TRAIN_TINY, "--set", f"output_dir={tmp_path / 'run'}",
                 "--set", f"data.train_shards=[{hostile['bad_shards'] / '000000.tar'}]"]
    proc = cnc(*args, *extra, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert match in proc.stdout + proc.stderr

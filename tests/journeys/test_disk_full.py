"""A full disk ends in one line that says "disk full at PATH", never a traceback or a half-written commit (issue 26.3).

Each case writes to a small tmpfs (the ``small_tmpfs`` fixture skips, with the reason, where mounting is not allowed):
the build's workers (the shard's reason and the summary keep errno and path), the build driver's own writes, and the
trainer's checkpoint (staged: the previous checkpoint stays the one ``--resume latest`` finds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import FAST_BUILD, REPO, TINY_CONFIG, make_photo_folder


def cnc(*args, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "cnc.cli", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    return proc


def _fill(folder, keep_bytes: int = 0) -> None:
    """Fill the tmpfs at ``folder`` up to ``keep_bytes`` free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, free - keep_bytes))
        except OSError:
            pass


def test_driver_writes_on_a_full_disk_are_one_line(small_tmpfs, tmp_path):
    disk = small_tmpfs(64)
    _fill(disk)
    src = tmp_path / "photos"
    make_photo_folder(src, 2, bad=())
    proc = cnc("build", "--config", TINY_CONFIG, "--input", src, "--output", disk / "out", timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: disk full at {disk / 'out'}"), proc.stderr[-3000:]
    assert "(ENOSPC: No space left on device)" in errors[0]


def test_build_workers_on_a_full_disk_name_errno_and_path(small_tmpfs, tmp_path, ray_local):
    """The shards cannot be staged: each shard's reason and the summary say "disk full at <staging file>"; nothing
    is committed; the driver's own small files still fit."""
    disk = small_tmpfs(96)
    src = tmp_path / "photos"
    make_photo_folder(src, 4, bad=())
    out = disk / "out"
    address = ray_local.get_runtime_context().gcs_address  # the session's Ray: a fresh one costs ~30 s
    sets = [*FAST_BUILD, "ray.num_workers=1", "ray.max_shard_retries=0"]
    proc = cnc("build", "--config", TINY_CONFIG, "--input", src, "--output", out, "--address", address,
               "--no-progress", *[a for s in sets for a in ("--set", s)])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-4000:]
    assert "(OSError [ENOSPC]" not in log  # named, not raw
    assert f"disk full at {out}/000000.tar." in log and "(ENOSPC: No space left on device)" in log, log[-4000:]
    assert "shard not committed: disk full at" in log  # the summary's reason row
    manifest = json.loads((out / "_cnc" / "manifest.json").read_text())
    assert manifest["shardlist"] == [] and manifest["totals"]["shards_uncommitted"] == [0, 1]
    assert not list(out.glob("*.tar*"))  # nothing partial left


def _train_args(shards, out, *extra: str) -> list:
    sets = [f"data.train_shards={shards}", f"output_dir={out}", "train.checkpointing_steps=1",
            "train.checkpoints_total_limit=10", "validation.num_samples=0", "train.progress_bar=false",
            "train.report_to=none", "data.preflight_shards=0", "train.train_batch_size=1", *extra]
    return ["train", "--config", REPO / "configs" / "train" / "tiny.yaml", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def checkpoint_bytes(tiny_shards, tmp_path_factory) -> int:
    """Bytes of one checkpoint of the tiny local stage (measured once, on the real disk)."""
    out = tmp_path_factory.mktemp("ckpt-size") / "run"
    proc = cnc(*_train_args(tiny_shards, out, "train.max_train_steps=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sum(p.stat().st_size for p in (out / "checkpoint-1").rglob("*") if p.is_file())


def test_training_checkpoint_on_a_full_disk_keeps_the_previous_one(small_tmpfs, tiny_shards, checkpoint_bytes):
    """Room for the run's first checkpoint, not its second: one line, exit 1, checkpoint-1 intact, nothing partial;
    --resume latest continues from it."""
    disk = small_tmpfs(max(64, int(checkpoint_bytes * 1.5) // 1024))
    out = disk / "run"
    proc = cnc(*_train_args(tiny_shards, out, "train.max_train_steps=3"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: could not write checkpoint-2: disk full at {out}/checkpoint-2.partial")
    assert errors[0].endswith("; checkpoint-1 is intact (--resume latest)")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()

"""``cnc train`` stopped by SIGTERM (preemption) exits 143 after saving a checkpoint, as ``cnc build`` does, so Slurm
and Kubernetes see an interrupted job, not a success (issue 26.7). SIGINT's 130 is checked in-process in
tests/cnc_model/training/test_trainer.py (``TrainResult.signal``)."""

from __future__ import annotations

import json
import os
import signal
import sys

from tests.support import REPO, start_driver


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_shards, tmp_path):
    out = tmp_path / "run"
    sets = [f"data.train_shards={tiny_shards}", f"output_dir={out}", "train.max_train_steps=200",
            "train.checkpointing_steps=1000", "validation.num_samples=0", "train.progress_bar=true",
            "train.report_to=none", "data.preflight_shards=0", "train.log_every=1"]
    cmd = [sys.executable, "-m", "cnc.cli", "train", "--config", str(REPO / "configs" / "train" / "tiny.yaml"),
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "CNC_TEST_FAULT_INJECTION": json.dumps({"step_delay_s": 0.5})}  # 200 steps: >= 100 s
    log = tmp_path / "train.log"
    proc = start_driver(cmd, log, lambda: "step 1/" in log.read_text(), cwd=REPO,
                        env=env, timeout=300)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text and "training interrupted at step" in text, text[-3000:]
    step = int(text.split("training interrupted at step ")[1].split(";")[0])
    assert 1 <= step < 200
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step

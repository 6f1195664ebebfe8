"""Tiny models as real checkpoints (issue 17.3): written once, atomically, loaded with from_pretrained."""

from __future__ import annotations

import threading

import torch

from cnc.hub import resolve_pretrained
from cnc.tiny import tiny_clip_vision
from cnc.tiny_store import materialize, tiny_key


def test_tiny_resolves_to_a_checkpoint_folder_with_the_seeded_weights(tmp_path, monkeypatch):
    from transformers import CLIPVisionModelWithProjection

    monkeypatch.setenv("CNC_CACHE", str(tmp_path))
    path = resolve_pretrained("tiny", "embed.model", seed=3)
    assert path == str(tmp_path / "tiny" / tiny_key() / "embed-seed3")
    loaded = CLIPVisionModelWithProjection.from_pretrained(path).state_dict()
    built = tiny_clip_vision(3)[0].state_dict()
    assert loaded.keys() == built.keys() and all(torch.equal(loaded[k], built[k]) for k in built)
    sam = resolve_pretrained("tiny", "segment.sam_checkpoint")
    assert sam.endswith(".pth") and torch.load(sam, weights_only=True)  # a plain state dict, safe to load


def test_parallel_writers_leave_one_complete_folder(tmp_path):
    results, errors = [], []

    def worker():
        try:
            results.append(materialize("depth", 0, root=tmp_path))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    parent = results[0].parent
    assert [p.name for p in parent.iterdir()] == ["depth-seed0"]  # no temporary folder left behind
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in results[0].iterdir()}
    mtime = (results[0] / "model.safetensors").stat().st_mtime_ns
    assert materialize("depth", 0, root=tmp_path) == results[0]  # written once
    assert (results[0] / "model.safetensors").stat().st_mtime_ns == mtime

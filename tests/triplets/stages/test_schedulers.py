"""The sync-free PNDM scheduler: the stock scheduler's outputs, without reading a tensor value per step."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cnc.tiny import synthetic_photo, tiny_scheduler
from triplets.stages.schedulers import sync_free

#: The operators that read a tensor's value on the host (a device synchronisation when the tensor is on a GPU).
HOST_READS = {"aten.item.default", "aten.is_nonzero.default", "aten._local_scalar_dense.default"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += str(func) in HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def stage(one_torch_thread):
    from cnc.hub import TINY, resolve_pretrained
    from triplets.stages.inpaint import InpaintStage

    stage = InpaintStage(resolve_pretrained(TINY, "inpaint.model"), num_inference_steps=1, device="cpu")
    stage.prompt_embeddings()
    assert type(stage.pipe.scheduler).__name__ == "SyncFreePNDMScheduler"  # the stage's default
    return stage


def test_inpainting_equals_the_stock_scheduler_and_reads_no_value_per_step(stage):
    from diffusers import PNDMScheduler

    r = 32
    rows = {"image": synthetic_photo(0, r, r)[None], "key": np.array(["a"], dtype=object),
            "mask": np.zeros((1, r, r), np.uint8)}
    rows["mask"][:, 8:20, 10:24] = 1
    sync_free_scheduler = stage.pipe.scheduler
    stock = PNDMScheduler.from_config(sync_free_scheduler.config)
    reads = {}
    for steps in (1, 3):
        stage.steps = steps
        for name, scheduler in (("sync-free", sync_free_scheduler), ("stock", stock)):
            stage.pipe.scheduler = scheduler
            with HostReads() as mode:
                out = stage.process(rows)[0]["background"]
            reads[steps, name] = mode.n, out
        stage.pipe.scheduler = sync_free_scheduler
        assert np.array_equal(reads[steps, "sync-free"][1], reads[steps, "stock"][1])  # bit for bit
    # the stock scheduler reads its timestep back at every step; the sync-free one never does
    assert reads[3, "stock"][0] - reads[1, "stock"][0] >= 2 * 2
    assert reads[3, "sync-free"][0] == reads[1, "sync-free"][0] <= 1


def test_steps_must_follow_the_schedule():
    s = sync_free(tiny_scheduler("pndm"))
    s.set_timesteps(3)
    x = torch.zeros(1, 4, 2, 2)
    s.step(x, int(s.timesteps[0]), x)
    with pytest.raises(ValueError, match="in order"):
        s.step(x, int(s.timesteps[0]), x)
    s.set_timesteps(4)
    s.set_begin_index(2)
    s.step(x, int(s.timesteps[2]), x)  # img2img-style start
    assert sync_free(tiny_scheduler("ddim")).__class__.__name__ == "DDIMScheduler"  # others unchanged

"""Denoising schedulers without host synchronisation.

diffusers' ``PNDMScheduler.step`` receives the pipeline's timestep as a 0-d tensor on the model's device and uses it
on the host: ``alphas_cumprod[timestep]`` (a CPU tensor indexed by a device scalar) and ``prev_timestep >= 0`` (a
device boolean in a Python ``if``) each copy it back, i.e. wait for every kernel queued so far, twice per step. The
GPU then idles while the host queues the next UNet call, and the loop cannot be captured in a CUDA graph.

:class:`SyncFreePNDMScheduler` keeps the timesteps on the host too and steps with the host value of the current
timestep (``begin_index + step count``, the position the pipeline's loop is at), so ``step`` touches no device
scalar. The arithmetic is the parent's, on the same Python numbers: outputs are identical.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def _sync_free_pndm():
    from diffusers import PNDMScheduler

    class SyncFreePNDMScheduler(PNDMScheduler):
        """``PNDMScheduler`` whose ``step`` never reads a device tensor (see the module docstring).

        Contract (what ``StableDiffusion*Pipeline`` loops do): after ``set_timesteps`` (and ``set_begin_index`` when
        the pipeline skips leading timesteps), ``step`` is called once per timestep, in order.
        """

        def set_timesteps(self, num_inference_steps: int, device=None):
            super().set_timesteps(num_inference_steps, device)
            self._host_timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
            self._begin_index = 0
            self._steps_taken = 0

        def set_begin_index(self, begin_index: int = 0) -> None:
            """Where the pipeline's loop starts in :attr:`timesteps` (img2img / inpainting with strength < 1)."""
            self._begin_index = int(begin_index)

        def host_timestep(self, timestep) -> int:
            """The current timestep as a Python int; a tensor ``timestep`` is never read (on a device, reading it
            waits for every queued kernel): the loop's position gives it."""
            import torch

            expected = int(self._host_timesteps[self._begin_index + self._steps_taken])
            if not isinstance(timestep, torch.Tensor) and int(timestep) != expected:
                raise ValueError(f"SyncFreePNDMScheduler: step called with timestep {int(timestep)}, the loop is at "
                                 f"{expected} (steps must follow scheduler.timesteps in order)")
            return expected

        def step(self, model_output, timestep, sample, return_dict: bool = True):
            t = self.host_timestep(timestep)
            self._steps_taken += 1
            return super().step(model_output, t, sample, return_dict=return_dict)

    return SyncFreePNDMScheduler


def sync_free(scheduler):
    """A :class:`SyncFreePNDMScheduler` with ``scheduler``'s config when it is a ``PNDMScheduler``; else itself."""
    from diffusers import PNDMScheduler

    if type(scheduler) is PNDMScheduler:
        return _sync_free_pndm().from_config(scheduler.config)
    return scheduler

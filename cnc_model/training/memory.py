"""Whether a training run needs gradient checkpointing, decided by measuring, not guessing.

Gradient checkpointing trades ≈ 18 % more FLOPs per step (the UNet decoder and the local fuser recompute their
activations in the backward pass) for activation memory. ``train.gradient_checkpointing: auto`` (the default)
decides it once, at start-up, on the training device: one forward + backward of a real batch shape **without**
checkpointing (:func:`measure_step_peak`), plus the optimizer state the first step will allocate
(:func:`optimizer_state_bytes`, exact), against the device's memory (:func:`decide_checkpointing`). It fits → off;
it does not (or the probe runs out of memory) → on. On a CPU there is no device memory to measure: off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)
#: Share of the device memory a step may peak at (the rest: allocator fragmentation, the loader's pinned buffers,
#: validation).
MEMORY_HEADROOM = 0.9


@dataclass(frozen=True)
class CheckpointingDecision:
    """The decision and the numbers behind it (bytes; ``None`` where not measured)."""

    enabled: bool
    reason: str
    peak_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    budget_bytes: int | None = None


def optimizer_state_bytes(params: Iterable[torch.nn.Parameter], optimizer: str = "adamw") -> int:
    """Bytes of optimizer state the first ``step()`` allocates: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in each
    parameter's dtype (2 × the parameter bytes; its scalar ``step`` counters are negligible); 8-bit AdamW keeps one
    byte per state value."""
    trained = [p for p in params if p.requires_grad]
    n_bytes = sum(p.numel() * p.element_size() for p in trained)
    n_values = sum(p.numel() for p in trained)
    return 2 * n_values if optimizer == "adamw8bit" else 2 * n_bytes


def decide_checkpointing(peak_bytes: int | None, state_bytes: int, total_bytes: int,
                         headroom: float = MEMORY_HEADROOM) -> CheckpointingDecision:
    """The rule: checkpointing off when the measured peak of a step without it plus the optimizer state fits in
    ``headroom`` of the device memory; on otherwise, or when the measurement ran out of memory (``peak_bytes`` None).
    """
    budget = int(headroom * total_bytes)
    if peak_bytes is None:
        return CheckpointingDecision(True, "a step without checkpointing ran out of device memory", None,
                                     state_bytes, budget)
    need = peak_bytes + state_bytes
    gib = 2 ** 30
    fits = need <= budget
    reason = (f"a step without it needs {need / gib:.1f} GiB (peak {peak_bytes / gib:.1f} + optimizer state "
              f"{state_bytes / gib:.1f}) {'<=' if fits else '>'} {budget / gib:.1f} GiB")
    return CheckpointingDecision(not fits, reason, peak_bytes, state_bytes, budget)


def measure_step_peak(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak device memory (bytes) allocated while ``step()`` runs (a forward + backward), or ``None`` if it ran out
    of memory. CUDA only (the caching allocator's peak counter)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def checkpointing_decision(device: torch.device, step: Callable[[], None],
                           params: Iterable[torch.nn.Parameter], optimizer: str = "adamw") -> CheckpointingDecision:
    """:func:`decide_checkpointing` for ``step`` (a forward + backward without checkpointing) on ``device``."""
    if torch.device(device).type != "cuda":
        return CheckpointingDecision(False, f"no device memory to measure on {torch.device(device).type}: off")
    peak = measure_step_peak(step, torch.device(device))
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return decide_checkpointing(peak, optimizer_state_bytes(list(params), optimizer), total)

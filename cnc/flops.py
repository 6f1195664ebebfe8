"""FLOPs counted by ``torch.utils.flop_counter``, on weightless (meta) copies of models.

* :func:`count_flops` runs a callable under :class:`~torch.utils.flop_counter.FlopCounterMode` and returns the total
  and the per-operator counts (a multiply-add is 2 FLOPs: ``mm`` of ``(m, k) @ (k, n)`` counts ``2·m·k·n``; a
  convolution ``2 · Cout · Cin/groups · kh · kw · Hout · Wout`` per sample; attention ``4 · B · H · Lq · Lk · d``).
  Only matrix products, convolutions and attention are counted (norms, activations, resizes are not): the number an
  MFU needs.
* :func:`meta_copy` makes a copy of any module whose parameters and buffers live on the ``meta`` device: running it
  on meta inputs costs no memory and no arithmetic, so a real-size model is counted in a second on a CPU.

Attention on CPU: ``F.scaled_dot_product_attention`` dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which ``torch.utils.flop_counter`` does not know (it counts 0 for it); :func:`count_flops` registers the standard
attention formula for it (and its backward) so a real CPU run counts what a meta or CUDA run counts.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """``softmax(Q·Kᵀ)·V`` of ``(B, H, Lq, d)``, ``(B, H, Lk, d)``, ``(B, H, Lk, dv)``: ``2·B·H·Lq·Lk·(d + dv)``."""
    *batch, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    b = 1
    for n in batch:
        b *= n
    return 2 * b * lq * lk * (d + dv)


def attention_backward_flops(query_shape, key_shape, value_shape) -> int:
    """Backward of :func:`attention_flops`: Q·Kᵀ recomputed, then dV, dP, dQ and dK: ``2·B·H·Lq·Lk·(3d + 2dv)``."""
    *batch, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    b = 1
    for n in batch:
        b *= n
    return 2 * b * lq * lk * (3 * d + 2 * dv)


def _register_cpu_attention() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in flop_registry:
        @register_flop_formula(forward)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return attention_flops(query_shape, key_shape, value_shape)
    if backward is not None and backward not in flop_registry:
        @register_flop_formula(backward)
        def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                               **kwargs) -> int:
            return attention_backward_flops(query_shape, key_shape, value_shape)


def count_flops(fn: Callable, *args, **kwargs) -> tuple[int, dict[str, int]]:
    """``fn(*args, **kwargs)`` under ``FlopCounterMode`` (no grad): ``(total FLOPs, {operator: FLOPs})``."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


class FlopCounting:
    """``with FlopCounting() as c: ...`` then ``c.total``: :func:`count_flops` for a block of code (grad allowed)."""

    def __enter__(self) -> FlopCounting:
        from torch.utils.flop_counter import FlopCounterMode

        _register_cpu_attention()
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self.total = int(self._mode.get_total_flops())


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are on the ``meta`` device (no weight is copied).

    Works for any module (diffusers, transformers, segment-anything, the project's own); a ``torch.compile`` wrapper
    is unwrapped; methods patched onto instances (e.g. the SDPA attention of :mod:`triplets.stages.sam_batch`) are
    kept, bound to the copy.
    """
    module = getattr(module, "_orig_mod", module)
    memo: dict[int, torch.Tensor] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in memo:
            m = torch.empty_like(t, device="meta")
            memo[id(t)] = torch.nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(
                t, torch.nn.Parameter) else m
    return copy.deepcopy(module, memo)

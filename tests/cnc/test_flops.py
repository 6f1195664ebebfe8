"""``cnc.flops``: the counter against hand-computed FLOPs of known matmuls, convolutions and attention, on the CPU
and on meta copies."""

import pytest
import torch
import torch.nn.functional as F

from cnc.flops import FlopCounting, attention_backward_flops, attention_flops, count_flops, meta_copy


def test_linear_and_matmul_count_two_flops_per_multiply_add():
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 7)
    assert count_flops(lin, x)[0] == 2 * 3 * 7 * 5  # (3, 7) @ (7, 5); the bias add is not a matmul
    a, b = torch.randn(2, 4, 6), torch.randn(2, 6, 9)
    total, by_op = count_flops(torch.bmm, a, b)
    assert total == 2 * 2 * 4 * 6 * 9 and by_op == {"bmm": total}


def test_convolution_counts_output_pixels_times_kernel():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, groups=1)
    x = torch.randn(2, 3, 16, 16)  # output 8x8
    assert count_flops(conv, x)[0] == 2 * 2 * 8 * 3 * 3 * 3 * 8 * 8
    grouped = torch.nn.Conv2d(4, 8, kernel_size=1, groups=2)
    assert count_flops(grouped, torch.randn(1, 4, 5, 5))[0] == 2 * 8 * 2 * 1 * 1 * 5 * 5


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_is_counted_on_cpu_and_meta(device):
    """torch.utils.flop_counter counts 0 for the CPU attention kernel by itself; cnc.flops registers it, so a real
    CPU run counts what a meta run (where SDPA decomposes into two bmm) counts."""
    b, h, lq, lk, d = 2, 3, 10, 12, 8
    q = torch.randn(b, h, lq, d, device=device)
    k, v = torch.randn(b, h, lk, d, device=device), torch.randn(b, h, lk, d, device=device)
    mask = torch.zeros(b, h, lq, lk, device=device)
    want = 4 * b * h * lq * lk * d
    assert attention_flops(q.shape, k.shape, v.shape) == want
    assert count_flops(F.scaled_dot_product_attention, q, k, v)[0] == want
    assert count_flops(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)[0] == want


def test_attention_backward_on_cpu():
    b, h, lq, d = 1, 2, 6, 8
    q, k, v = (torch.randn(b, h, lq, d, requires_grad=True) for _ in range(3))
    with FlopCounting() as c:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert attention_backward_flops(q.shape, k.shape, v.shape) == 2 * b * h * lq * lq * (3 * d + 2 * d)
    assert c.total == attention_flops(q.shape, k.shape, v.shape) + attention_backward_flops(q.shape, k.shape, v.shape)


def test_meta_copy_counts_like_the_model_without_copying_weights():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10))
    x = torch.randn(2, 3, 8, 8)
    meta = meta_copy(model)
    assert all(p.device.type == "meta" for p in (*meta.parameters(), *meta.buffers()))
    assert all(p.device.type == "cpu" for p in model.parameters())  # the original is untouched
    assert isinstance(meta[3].weight, torch.nn.Parameter)
    assert count_flops(meta, x.to("meta"))[0] == count_flops(model.eval(), x)[0] == \
        2 * 2 * 4 * 3 * 9 * 36 + 2 * 2 * 144 * 10

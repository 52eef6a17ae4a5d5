"""The chunked token loss (losses.py) against the one-shot fp32 cross-entropy it replaces:
the same value and the same gradients to fp32 rounding, with ignored labels, the causal shift,
bf16 logits and chunks that do not divide the token count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_bilevel.data import IGNORE_INDEX
from ds_bilevel.losses import linear_token_loss_sum, loss_sum, shifted_targets, token_loss_sum


def unchunked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss as it was before chunking: the whole shifted logits upcast at once."""
    shifted = logits[:, :-1].flatten(0, 1).float()
    return F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def batch(b=3, t=11, v=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :4] = IGNORE_INDEX           # a prompt
    labels[1, -3:] = IGNORE_INDEX          # padding
    labels[2, 5] = IGNORE_INDEX            # a hole
    return logits, labels


def grads(fn, logits, labels, scale=1.7):
    x = logits.detach().clone().requires_grad_(True)
    value = fn(x, labels)
    (value * scale).backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("chunk_elements", [1, 37 * 4, 37 * 7, 10 ** 9])  # 1 row, 4 rows, 7 (uneven), all
def test_chunked_matches_unchunked_fp32(chunk_elements):
    logits, labels = batch()
    ref_value, ref_grad = grads(unchunked, logits, labels)
    value, grad = grads(lambda x, y: token_loss_sum(x, y, chunk_elements=chunk_elements), logits, labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref_value, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    # the last position and every ignored label contribute nothing to the gradient
    assert torch.all(grad[:, -1] == 0)
    assert torch.all(grad[0, :3] == 0) and torch.all(grad[2, 4] == 0)


def test_chunked_matches_unchunked_bf16():
    logits, labels = batch(b=3, t=17, v=101, dtype=torch.bfloat16, seed=1)
    ref_value, ref_grad = grads(unchunked, logits, labels)
    value, grad = grads(lambda x, y: token_loss_sum(x, y, chunk_elements=101 * 5), logits, labels)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, ref_value, rtol=2e-6, atol=1e-5)  # fp32 inside: same value
    # both compute the gradient in fp32 and round it to bf16 once: at most one bf16 ulp apart
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2 ** -8, atol=1e-6)


def test_shifted_targets():
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7], [1, 2, 3, 4]])
    assert shifted_targets(labels).tolist() == [6, IGNORE_INDEX, 7, IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX]


def test_all_ignored_is_zero_with_zero_gradient():
    logits, labels = batch()
    labels[:] = IGNORE_INDEX
    value, grad = grads(lambda x, y: token_loss_sum(x, y, chunk_elements=37 * 4), logits, labels)
    assert value.item() == 0.0 and torch.all(grad == 0)


def test_loss_sum_dispatch():
    logits, labels = batch()
    torch.testing.assert_close(loss_sum(logits, labels), unchunked(logits, labels), rtol=2e-6, atol=1e-5)
    cls_logits, cls_labels = torch.randn(4, 3), torch.tensor([0, 2, IGNORE_INDEX, 1])
    torch.testing.assert_close(loss_sum(cls_logits, cls_labels),
                               F.cross_entropy(cls_logits, cls_labels, ignore_index=IGNORE_INDEX, reduction="sum"))


def saved_sizes(fn) -> list[tuple[torch.dtype, int]]:
    sizes = []

    def pack(t):
        sizes.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_no_fp32_copy_of_the_logits_is_kept_for_backward():
    logits, labels = batch(b=3, t=64, v=512, dtype=torch.bfloat16)
    x = logits.requires_grad_(True)
    full = logits.numel()
    before = saved_sizes(lambda: unchunked(x, labels))
    after = saved_sizes(lambda: token_loss_sum(x, labels, chunk_elements=512 * 16))
    assert any(d == torch.float32 and n >= full * 0.9 for d, n in before)  # the upcast log-softmax
    assert not any(d == torch.float32 and n > 512 * 16 for d, n in after)   # at most a chunk...
    assert sum(n for d, n in after if d == torch.bfloat16) == full          # ...and the bf16 logits once


def linear_case(bias: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 11, 16, generator=g).to(dtype)
    weight = (torch.randn(37, 16, generator=g) * 0.5).to(dtype)
    b = (torch.randn(37, generator=g) * 0.1).to(dtype) if bias else None
    _, labels = batch()
    return hidden, weight, b, labels


@pytest.mark.parametrize("bias", [False, True])
def test_linear_chunked_matches_linear_then_unchunked(bias):
    hidden, weight, b, labels = linear_case(bias)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
    ref = unchunked(F.linear(leaves[0], leaves[1], leaves[2] if bias else None), labels)
    ref_grads = torch.autograd.grad(ref * 1.7, leaves)
    mine = [t.clone().requires_grad_(True) for t in leaves]
    value = linear_token_loss_sum(mine[0], mine[1], labels, bias=mine[2] if bias else None, chunk_elements=37 * 5)
    my_grads = torch.autograd.grad(value * 1.7, mine)
    torch.testing.assert_close(value, ref, rtol=2e-6, atol=1e-5)
    for a, r in zip(my_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_linear_frozen_weight_keeps_no_logits():
    hidden, weight, _, labels = linear_case(False, torch.bfloat16)
    h = hidden.requires_grad_(True)
    sizes = saved_sizes(lambda: linear_token_loss_sum(h, weight, labels, chunk_elements=37 * 5))
    assert max(n for _, n in sizes) <= max(hidden.numel(), weight.numel())  # no (N, V) tensor saved
    value = linear_token_loss_sum(h, weight, labels, chunk_elements=37 * 5)
    (grad,) = torch.autograd.grad(value, h)
    ref = unchunked(F.linear(h.float(), weight.float()), labels)
    (ref_grad,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(value, ref, rtol=1e-3, atol=1e-2)  # bf16 logits vs fp32 logits
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2e-2, atol=2e-2)


def test_double_backward_matches_unchunked():
    """create_graph through the loss (tests' autograd references of the hypergradients): the
    Hessian-vector product of the chunked loss is the unchunked one's."""
    logits, labels = batch()
    v = torch.randn_like(logits)

    def hvp(fn):
        x = logits.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x, labels), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return h

    torch.testing.assert_close(hvp(lambda x, y: token_loss_sum(x, y, chunk_elements=37 * 4)), hvp(unchunked),
                               rtol=1e-5, atol=1e-6)

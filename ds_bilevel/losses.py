"""The training and evaluation losses, as sums: the caller divides by the global count.

Summing here and dividing once by the whole global batch's count (labelled tokens, or
examples for a classifier; ``data.labelled_count``) is what makes a pass's gradient the mean
over the global batch however it is split across ranks and micro-batches (engine.forward_loss).

Which loss applies is read off the labels' shape: (B, T) token labels are a causal LM's
(next-token cross-entropy on the labelled positions), (B,) class ids a sequence classifier's
(cross-entropy of the (B, C) logits).

The token loss never upcasts the whole (B, T, V) logits to fp32 (4.2 GB at 8192 tokens x
128256 vocabulary): it runs over chunks of tokens, each upcast on its own, and keeps for the
backward only the logits it was given (already alive as the model's output), the shifted
labels and one fp32 log-sum-exp per token; the backward recomputes each chunk's softmax. The
peak beyond the logits is one fp32 chunk (``CHUNK_ELEMENTS``), and the result equals the
one-shot fp32 cross-entropy to fp32 rounding (tests/test_losses.py). ``linear_token_loss_sum``
goes further and never builds the logits at all: it takes the last hidden states and the
output projection's weight and applies the projection per chunk (a chunked linear +
cross-entropy, as Liger's fused linear cross-entropy and torchtune's chunked loss do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_bilevel.data import IGNORE_INDEX

# fp32 elements of one chunk of logits (rows x vocabulary): 2**25 is 128 MiB, about 260 tokens
# of a 128256 vocabulary. Small enough to be noise next to the model, large enough that the
# per-chunk kernel launches do not matter.
CHUNK_ELEMENTS = 2 ** 25


def _chunk_rows(vocab: int, chunk_elements: int | None) -> int:
    return max(1, (chunk_elements or CHUNK_ELEMENTS) // max(1, vocab))


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B*T,) next-token targets aligned with the unshifted logits: position t is scored against
    label t+1, the last position of each row is ignored. Shifting the labels rather than slicing
    the logits (``logits[:, :-1]``) saves a (B, T-1, V) copy."""
    ignore = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], ignore], dim=1).flatten()


def _chunk_loss(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, per-row log-sum-exp) of fp32 logits ``x`` (n, V) against ``targets`` (n,)."""
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != IGNORE_INDEX
    picked = x.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, lse - picked, torch.zeros_like(lse)).sum(), lse


def _chunk_grad(x: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d(summed loss)/dx for one fp32 chunk, times ``scale``: (softmax - onehot) on labelled rows.

    Under ``create_graph`` (grad mode on inside a backward: a test's double backward) the same
    value from out-of-place ops on the recomputed softmax, so that autograd can differentiate it."""
    valid = targets != IGNORE_INDEX
    if torch.is_grad_enabled():
        onehot = F.one_hot(targets.clamp(min=0), x.shape[-1]).to(x.dtype)
        return (torch.softmax(x, dim=-1) - onehot) * (valid.to(x.dtype) * scale).unsqueeze(1)
    grad = torch.exp(x - lse.unsqueeze(1))
    rows = torch.arange(len(targets), device=x.device)
    grad[rows, targets.clamp(min=0)] -= 1.0
    return grad.mul_((valid.to(grad.dtype) * scale).unsqueeze(1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (N, V) logits in any dtype, fp32 inside, chunked over rows."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            part, lse[start:start + rows] = _chunk_loss(logits[start:start + rows].float(), targets[start:start + rows])
            total += part
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        spans = [(start, start + ctx.rows) for start in range(0, logits.shape[0], ctx.rows)]
        if torch.is_grad_enabled():  # create_graph: out of place, differentiable
            return torch.cat([_chunk_grad(logits[a:b].float(), targets[a:b], lse[a:b], grad_total).to(logits.dtype)
                              for a, b in spans]), None, None
        grad = torch.empty_like(logits)
        for a, b in spans:
            grad[a:b] = _chunk_grad(logits[a:b].float(), targets[a:b], lse[a:b], grad_total)
        return grad, None, None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` (+ bias), never holding more than one chunk
    of logits; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, rows: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            x = F.linear(hidden[start:start + rows], weight, bias).float()
            part, lse[start:start + rows] = _chunk_loss(x, targets[start:start + rows])
            total += part
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        hidden_parts, weight_grad, bias_grad = [], None, None
        for start in range(0, hidden.shape[0], ctx.rows):
            end = start + ctx.rows
            h = hidden[start:end]
            g = _chunk_grad(F.linear(h, weight, bias).float(), targets[start:end], lse[start:end], grad_total)
            if need_hidden:
                hidden_parts.append((g.to(weight.dtype) @ weight).to(hidden.dtype))
            if need_weight:
                part = g.t() @ h.float()
                weight_grad = part if weight_grad is None else weight_grad + part
            if need_bias:
                bias_grad = g.sum(0) if bias_grad is None else bias_grad + g.sum(0)
        # the (N, H) hidden gradient is as large as the hidden states; the (V, H) weight gradient
        # accumulates in fp32 over chunks (only when the projection itself trains)
        return (torch.cat(hidden_parts) if need_hidden else None,
                None if weight_grad is None else weight_grad.to(weight.dtype),
                None if bias_grad is None else bias_grad.to(bias.dtype), None, None)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions, in fp32. logits (B, T, V), labels (B, T)."""
    vocab = logits.shape[-1]
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, vocab), shifted_targets(labels),
                                      _chunk_rows(vocab, chunk_elements))


def linear_token_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, chunk_elements: int | None = None) -> torch.Tensor:
    """``token_loss_sum(F.linear(hidden, weight, bias), labels)`` without the (B, T, V) logits:
    hidden (B, T, H) are the last hidden states (after the final norm), weight (V, H) the output
    projection's. Under ZeRO-3 call it where the weight is gathered (inside the lm_head module's
    forward, whose hooks also gather it again for this function's backward)."""
    vocab = weight.shape[0]
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                            shifted_targets(labels), _chunk_rows(vocab, chunk_elements))


def class_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed classification cross-entropy over labelled examples, in fp32. logits (B, C), labels (B,)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def is_classification(labels: torch.Tensor) -> bool:
    return labels.dim() == 1


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed loss that ``labels`` call for (see the module docstring)."""
    return (class_loss_sum if is_classification(labels) else token_loss_sum)(logits, labels)


def predictions_right(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the argmax class is the label, or (token labels) the argmax is the reference at
    every labelled position (exact match by teacher forcing). Unlabelled examples count as right."""
    if is_classification(labels):
        return (logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)
    target = labels[:, 1:]
    return ((logits[:, :-1].argmax(-1) == target) | (target == IGNORE_INDEX)).all(dim=1)

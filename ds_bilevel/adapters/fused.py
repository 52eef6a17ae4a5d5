"""The adapted linear layer's activation path as one autograd node (issue 13: GPU speed).

    y = x W0^T + bias + (x_drop A^T) b^T              (LoRA, Bi-LoRA: b = s B)
    y = scale * (x W0^T + (x A^T) b^T) + bias         (DoRA without dropout: scale = m / ||W0 + s B A||_row)

The plain autograd form of the same formula (the layers' code before this file) writes the
base output, the low-rank output, its product by s and their sum, each a pass over the
(tokens, out) activations, and its backward adds two more (the product by s again, and the
sum of the two gradients of x, a (tokens, in) pass). Here s sits in the small factor b, the
low-rank term is accumulated into the base output by the matmul itself (``addmm_``), DoRA's
magnitude and the bias are applied in one ``addcmul``, and backward accumulates
grad_x = g W0 + (g b) A in one output, so the passes over activations are the matmuls' own.
On a GPU each avoided pass is an elementwise kernel as large as the layer's output. A low
rank of several modules at once (Bi-LoRA's primary and auxiliary) is one product of their
stacked factors [A1; A2], [B1 B2]: 2 forward and 3 backward matmuls instead of 4 and 6.

The node saves the base weight as the stored parameter, never a view (ZeRO-3 gathers a
parameter's data again before its layer's backward, but a view taken in forward keeps the
storage it released: see bilora_sam's note), and a Conv1D weight (in, out) is used as
stored. The base must be frozen (``fusable``): the node gives the base weight and bias no
gradient. Backward is itself differentiable: under ``create_graph`` (the tests' double
backward, torch.autograd.functional.jacobian) it recomputes the intermediates it saved from
the saved inputs, so second derivatives are those of the plain formula.
"""

from __future__ import annotations

import torch
from torch import nn


def _base_t(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """W0^T (in, out) from the stored weight: Linear's (out, in) transposed, Conv1D's as stored."""
    return weight if conv1d else weight.t()


class AdaptedLinear(torch.autograd.Function):
    """See the module docstring. ``x_drop`` None means the low-rank path sees ``x`` itself;
    ``scale`` None means no DoRA magnitude (and DoRA's path takes no ``x_drop``)."""

    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, a, b, scale, conv1d):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        xd2 = x2 if x_drop is None else x_drop.reshape(-1, in_features)
        w_t = _base_t(weight, conv1d)
        h = torch.mm(xd2, a.t())  # (N, R)
        # The output is allocated in x's leading shape: a view of an intermediate returned from a
        # custom Function could not be modified in place by the model's code after it.
        y = x.new_empty(*x.shape[:-1], w_t.shape[1])
        y2 = y.view(-1, w_t.shape[1])
        if scale is None and bias is not None:
            torch.addmm(bias, x2, w_t, out=y2)
        else:
            torch.mm(x2, w_t, out=y2)
        y2.addmm_(h, b.t())  # base + low rank, accumulated by the matmul
        if scale is None:
            out, saved_y = y, None
        else:  # DoRA: y is kept, d out / d scale = sum over tokens of grad * y
            out = y * scale if bias is None else torch.addcmul(bias, y, scale)
            saved_y = y
        ctx.conv1d, ctx.has_drop, ctx.has_scale = conv1d, x_drop is not None, scale is not None
        # x itself is saved only as the low-rank input (without dropout): the base's gradient needs W0 alone.
        ctx.save_for_backward(x if x_drop is None else x_drop, weight, a, b, scale, h, saved_y)
        return out

    @staticmethod
    def backward(ctx, grad):
        xd, weight, a, b, scale, h, y = ctx.saved_tensors
        need_x, need_xd, _, _, need_a, need_b, need_scale, _ = ctx.needs_input_grad
        in_features = xd.shape[-1]
        xd2 = xd.reshape(-1, in_features)
        g = grad.reshape(-1, grad.shape[-1])
        differentiable = torch.is_grad_enabled()  # create_graph: the saved h and y carry no graph
        if differentiable:
            h = torch.mm(xd2, a.t())
            if ctx.has_scale:
                y = torch.mm(xd2, _base_t(weight, ctx.conv1d)) + torch.mm(h, b.t())
        grad_scale = None
        if ctx.has_scale:
            if need_scale:
                grad_scale = (g * y.reshape(g.shape)).sum(0)
            g = g * scale
        grad_x = grad_xd = grad_a = grad_b = None
        if need_b:
            grad_b = torch.mm(g.t(), h)  # (out, R)
        low_rank_x = need_xd or (need_x and not ctx.has_drop)
        if need_a or low_rank_x:
            gh = torch.mm(g, b)  # (N, R)
            if need_a:
                grad_a = torch.mm(gh.t(), xd2)  # (R, in)
        if need_x:
            w = weight.t() if ctx.conv1d else weight  # W0 (out, in)
            grad_x = torch.mm(g, w)
            if not ctx.has_drop:  # grad_x = g W0 + (g b) A, accumulated in one output
                grad_x = grad_x + torch.mm(gh, a) if differentiable else grad_x.addmm_(gh, a)
            grad_x = grad_x.view(grad.shape[:-1] + (in_features,))
        if need_xd:
            grad_xd = torch.mm(gh, a).view(grad.shape[:-1] + (in_features,))
        return grad_x, grad_xd, None, None, grad_a, grad_b, grad_scale, None


def fusable(base_layer: nn.Module) -> bool:
    """Whether ``AdaptedLinear`` may compute this base: frozen weight and bias (it gives them no
    gradient). A Python attribute read, no device sync."""
    bias = base_layer.bias
    return not base_layer.weight.requires_grad and (bias is None or not bias.requires_grad)


def adapted_linear(x: torch.Tensor, x_drop: torch.Tensor | None, base_layer: nn.Module, conv1d: bool,
                   a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``AdaptedLinear`` on a frozen nn.Linear or Conv1D ``base_layer``; ``b`` already scaled by s.
    ``x_drop`` that is ``x`` itself (dropout in eval mode) counts as no dropout."""
    if x_drop is x:
        x_drop = None
    if scale is not None and x_drop is not None:
        raise ValueError("adapted_linear: DoRA's magnitude is fused only without dropout")
    return AdaptedLinear.apply(x, x_drop, base_layer.weight, base_layer.bias, a, b, scale, conv1d)


class ReverseGrad(torch.autograd.Function):
    """Identity whose backward negates the gradient (gradient reversal, Ganin and Lempitsky 2015):
    applied to a parameter, backward hands it -dL/dparam. Saves nothing."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad

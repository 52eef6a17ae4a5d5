"""The fused adapted-linear node (adapters/fused.py) against plain autograd of the same formulas.

Every method's layer forward and the gradients of x and of every adapter parameter, on an
nn.Linear with and without bias and on transformers' Conv1D, in fp32 (to rounding) and bf16
(close), with dropout under a fixed seed, Bi-LoRA's reversed auxiliary gradients, second
derivatives (the tests' double backward through BiLoRA/BiDoRA), activation checkpointing, and
the plain path kept for a base that is not frozen.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import randomize
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from ds_bilevel.adapters import BiDoraLayer, BiLoraLayer, BiLoraSamLayer, DoraLayer, LoraLayer
from ds_bilevel.adapters.fused import AdaptedLinear

IN, OUT, RANK, AUX_RANK = 24, 16, 4, 3
LAYERS = {"lora": LoraLayer, "dora": DoraLayer, "bidora": BiDoraLayer, "bilora": BiLoraLayer,
          "bilora_sam": BiLoraSamLayer}
BASES = ["linear_bias", "linear", "conv1d"]


def make_base(kind: str, dtype=torch.float32) -> nn.Module:
    if kind == "conv1d":
        base = Conv1D(OUT, IN)  # weight (in, out)
        with torch.no_grad():
            base.weight.normal_(0, 0.2)
            base.bias.normal_(0, 0.1)
        return base.to(dtype)
    return nn.Linear(IN, OUT, bias=kind == "linear_bias").to(dtype)


def make_layer(method: str, base: str, dtype=torch.float32, dropout: float = 0.0, ascend: bool = False,
               seed: int = 0):
    torch.manual_seed(seed)
    kwargs = {"aux_rank": AUX_RANK} if method == "bilora_sam" else {}
    layer = LAYERS[method](make_base(base, dtype), RANK, 2.0 * RANK, dropout, **kwargs)
    layer.ascend_in_backward = ascend
    randomize(layer, seed + 1, std=0.3)  # a trained state: B != 0, m != ||W0||, lambda away from uniform
    return layer


def plain(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's formula as plain autograd ops (the layers' code before the fused node)."""
    w0 = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight  # (out, in)
    bias, s = layer.base_layer.bias, layer.scaling
    if isinstance(layer, BiLoraLayer):
        x_drop = layer.dropout(x)
        h = F.linear(x_drop, layer.lora_Q) * layer.lambdas()
        return F.linear(x, w0, bias) + F.linear(h, layer.lora_P) * s

    def low_rank(v, a, b):
        return F.linear(F.linear(v, a), b) * s

    if isinstance(layer, DoraLayer):
        norm = (w0 + s * layer.lora_B @ layer.lora_A).norm(p=2, dim=1)
        scale = layer.magnitude / (norm.detach() if layer.detach_norm else norm)
        if isinstance(layer.dropout, nn.Identity):
            out = scale * (F.linear(x, w0) + low_rank(x, layer.lora_A, layer.lora_B))
            return out if bias is None else out + bias
        x_drop = layer.dropout(x)
        return F.linear(x, w0, bias) + (scale - 1) * F.linear(x_drop, w0) + scale * low_rank(
            x_drop, layer.lora_A, layer.lora_B)
    x_drop = layer.dropout(x)
    out = F.linear(x, w0, bias) + low_rank(x_drop, layer.lora_A, layer.lora_B)
    if isinstance(layer, BiLoraSamLayer) and layer.auxiliary_enabled:
        out = out + low_rank(x_drop, layer.aux_A, layer.aux_B)
    return out


def params(layer) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in layer.named_parameters() if not n.startswith("base_layer")]


def run(forward, layer, x, grad, seed: int = 7):
    """Output and gradients of x and every adapter parameter, dropout drawn from ``seed``."""
    torch.manual_seed(seed)
    out = forward(layer, x)
    names, tensors = zip(*params(layer), strict=True)
    grads = torch.autograd.grad(out, [x, *tensors], grad)
    return out.detach(), dict(zip(["x", *names], grads, strict=True))


def compare(method, base, dtype=torch.float32, dropout=0.0, ascend=False, tol=1e-6):
    layer = make_layer(method, base, dtype, dropout, ascend)
    layer.train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, IN, generator=gen).to(dtype).requires_grad_(True)
    grad = torch.randn(2, 5, OUT, generator=gen).to(dtype)
    out, grads = run(lambda m, v: m(v), layer, x, grad)
    ref_out, ref_grads = run(plain, layer, x, grad)

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))

    assert out.dtype == dtype and out.shape == ref_out.shape
    assert rel(out, ref_out) <= tol, rel(out, ref_out)
    for name, g in grads.items():
        expected = ref_grads[name]
        if ascend and name.startswith("aux_"):
            expected = -expected  # the ascent: the auxiliary module gets -dL/dparam
        assert g.dtype == expected.dtype and g.shape == expected.shape, name
        assert rel(g, expected) <= tol, (name, rel(g, expected))
    return layer


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", list(LAYERS))
def test_equals_plain_autograd_fp32(method, base):
    compare(method, base)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", list(LAYERS))
def test_close_to_plain_autograd_bf16(method, base):
    compare(method, base, torch.bfloat16, tol=2e-2)


@pytest.mark.parametrize("base", ["linear_bias", "conv1d"])
@pytest.mark.parametrize("method", ["lora", "dora", "bilora", "bilora_sam"])
def test_dropout_under_a_fixed_seed(method, base):
    """Base sees x, the low-rank path dropout(x), the same mask as the plain form draws."""
    layer = compare(method, base, dropout=0.3)
    torch.manual_seed(7)
    x = torch.randn(2, 5, IN)
    assert not torch.equal(layer(x), plain(layer.eval(), x))  # the mask is live in training


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base", BASES)
def test_bilora_sam_ascent_negates_only_the_auxiliary_gradients(base, dropout):
    compare("bilora_sam", base, dropout=dropout, ascend=True)


def test_bilora_sam_inference_is_lora_and_no_grad_needs_no_reversal():
    layer = make_layer("bilora_sam", "linear_bias", ascend=True)
    x = torch.randn(3, IN)
    layer.auxiliary_enabled = False
    expected = F.linear(x, layer.base_layer.weight, layer.base_layer.bias) + \
        layer.scaling * F.linear(x, layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.auxiliary_enabled = True
    with torch.no_grad():
        assert layer(x).grad_fn is None
        torch.testing.assert_close(layer(x), plain(layer, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora", "bilora_sam"])
def test_a_base_that_trains_keeps_the_plain_path(method):
    layer = make_layer(method, "linear_bias")
    layer.base_layer.requires_grad_(True)
    x = torch.randn(3, IN)
    out = layer(x)
    out.sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.base_layer.bias.grad is not None
    torch.testing.assert_close(out, plain(layer, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora", "bilora_sam"])
def test_output_is_not_a_view_and_input_without_grad(method):
    """The model's code may modify the output in place; an input that needs no gradient (the
    first layer over frozen embeddings) gets none computed, the parameters still do."""
    layer = make_layer(method, "linear_bias", ascend=True)
    x = torch.randn(2, 5, IN)
    out = layer(x)
    out.mul_(2)  # raises for a view of an intermediate returned by a custom Function
    out.sum().backward()
    assert all(p.grad is not None for _, p in params(layer))


@pytest.mark.parametrize("method", ["lora", "dora", "bilora_sam"])
def test_under_activation_checkpointing(method):
    layer = make_layer(method, "conv1d", ascend=True)
    x = torch.randn(2, 5, IN, requires_grad=True)
    grad = torch.randn(2, 5, OUT)
    out, grads = run(lambda m, v: m(v), layer, x, grad)
    ckpt_out, ckpt_grads = run(lambda m, v: checkpoint(m, v, use_reentrant=False), layer, x, grad)
    assert torch.equal(out, ckpt_out)
    assert all(torch.equal(grads[n], ckpt_grads[n]) for n in grads)


@pytest.mark.parametrize("base", ["linear_bias", "conv1d"])
@pytest.mark.parametrize("method", ["bilora", "bidora", "lora"])
def test_second_derivatives_equal_plain_autograd(method, base):
    """Hessian-vector products through the layer (create_graph, as the hypergradient tests
    differentiate BiLoRA and BiDoRA twice) equal those of the plain formula, in fp64."""
    layer = make_layer(method, base).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, IN, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, OUT, generator=gen, dtype=torch.float64)
    tensors = [x] + [p for _, p in params(layer)]
    vectors = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in tensors]

    def hvp(forward):
        loss = (forward(layer, x) - target).square().sum()
        grads = torch.autograd.grad(loss, tensors, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vectors, strict=True))
        return grads, torch.autograd.grad(dot, tensors)

    grads, hv = hvp(lambda m, v: m(v))
    ref_grads, ref_hv = hvp(plain)
    for a, b in zip([*grads, *hv], [*ref_grads, *ref_hv], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("variant", ["plain", "dropout", "scale"])
def test_node_gradcheck_and_gradgradcheck(variant, conv1d):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    x = rand(3, 2, 5)
    x_drop = rand(3, 2, 5) if variant == "dropout" else None
    weight = rand(*((5, 4) if conv1d else (4, 5)), grad=False)
    bias = rand(4, grad=False)
    scale = (rand(4, grad=False).abs() + 0.5).requires_grad_(True) if variant == "scale" else None
    inputs = (x, x_drop, rand(3, 5), rand(4, 3), scale)

    def node(x, x_drop, a, b, scale):
        return AdaptedLinear.apply(x, x_drop, weight, bias, a, b, scale, conv1d)

    assert torch.autograd.gradcheck(node, inputs)
    assert torch.autograd.gradgradcheck(node, inputs)

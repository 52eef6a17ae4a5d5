"""BiLoRA: dW = s P diag(lambda) Q for each lambda parameterisation, its init and its regularisers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_bilevel.adapters import AdapterConfig, BiLoraLayer
from ds_bilevel.levels import Level

LAMBDA_OF_RAW = {
    "real": lambda raw: raw,
    "softmax": lambda raw: torch.softmax(raw, 0),
    "binary": torch.sigmoid,
}


def make_layer(lambda_param: str = "softmax", out_f: int = 16, in_f: int = 24, **kwargs) -> BiLoraLayer:
    torch.manual_seed(0)
    config = AdapterConfig(method="bilora", rank=4, alpha=6.0, lambda_param=lambda_param, **kwargs)
    return BiLoraLayer.from_config(nn.Linear(in_f, out_f), config)


@torch.no_grad()
def randomize(layer: BiLoraLayer) -> None:
    gen = torch.Generator().manual_seed(3)
    for p in (layer.lora_P, layer.lora_Q, layer.lambda_raw):
        p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("lambda_param, expected", [("real", 1.0), ("softmax", 0.25), ("binary", 0.5)])
def test_init_is_a_noop_with_documented_lambda(lambda_param, expected):
    layer = make_layer(lambda_param)
    assert torch.equal(layer.lambdas(), torch.full((4,), expected))
    assert torch.equal(layer.lora_P, torch.zeros(16, 4))
    assert layer.lora_Q.abs().max() > 0  # Kaiming-uniform, bound 1 / sqrt(in)
    assert layer.lora_Q.abs().max() <= 1 / 24**0.5
    assert torch.equal(layer.merged_weight(), layer.base_layer.weight)
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("lambda_param", ["real", "softmax", "binary"])
def test_delta_weight_is_s_P_diag_lambda_Q(lambda_param):
    layer = make_layer(lambda_param)
    randomize(layer)
    lam = LAMBDA_OF_RAW[lambda_param](layer.lambda_raw.detach())
    expected = 1.5 * layer.lora_P.detach() @ torch.diag(lam) @ layer.lora_Q.detach()  # s = 6 / 4
    w0 = layer.base_layer.weight
    torch.testing.assert_close(layer.merged_weight() - w0, expected, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 24)
    expected_out = F.linear(x, w0 + expected, layer.base_layer.bias)
    torch.testing.assert_close(layer(x), expected_out, rtol=1e-5, atol=1e-6)


def test_orthogonality_regulariser_matches_direct_computation():
    layer = make_layer(orth_reg_weight=0.3)
    randomize(layer)
    p, q = layer.lora_P.detach(), layer.lora_Q.detach()
    eye = torch.eye(4)
    r1 = torch.linalg.matrix_norm(p.T @ p - eye) ** 2 + torch.linalg.matrix_norm(q @ q.T - eye) ** 2
    torch.testing.assert_close(layer.orthogonality(), r1, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.regularizer(Level.INNER), 0.3 * r1, rtol=1e-6, atol=0)
    assert layer.regularizer(Level.OUTER) is None  # softmax: no outer regulariser
    assert make_layer(orth_reg_weight=0.0).regularizer(Level.INNER) is None


def test_orthonormal_factors_have_zero_R1():
    layer = make_layer()
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(24, 4))  # (in, r), orthonormal columns
        p, _ = torch.linalg.qr(torch.randn(16, 4))
        layer.lora_Q.copy_(q.T)
        layer.lora_P.copy_(p)
    assert layer.orthogonality() < 1e-10


def test_binary_regulariser_matches_direct_computation():
    layer = make_layer("binary", binary_reg_weight=0.2)
    randomize(layer)
    lam = torch.sigmoid(layer.lambda_raw.detach())
    torch.testing.assert_close(layer.binary_penalty(), (lam * (1 - lam)).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.regularizer(Level.OUTER), 0.2 * (lam * (1 - lam)).mean(),
                               rtol=1e-6, atol=0)
    # R2 pushes each lambda towards the nearer of 0 and 1: its gradient on raw has the sign of 1/2 - lambda.
    layer.regularizer(Level.OUTER).backward()
    assert torch.equal(torch.sign(layer.lambda_raw.grad), torch.sign(0.5 - lam))
    assert make_layer("binary", binary_reg_weight=0.0).regularizer(Level.OUTER) is None
    assert make_layer("real").regularizer(Level.OUTER) is None


def test_bf16_softmax_lambdas_keep_their_sum():
    layer = make_layer("softmax")
    layer.to(torch.bfloat16)
    randomize(layer)
    assert layer.lambdas().dtype == torch.bfloat16
    assert abs(float(layer.lambdas().detach().float().sum()) - 1) < 4 * torch.finfo(torch.bfloat16).eps


def test_unknown_lambda_param_is_rejected():
    with pytest.raises(ValueError, match=r"adapter.lambda_param: 'sparse'.*\['real', 'softmax', 'binary'\]"):
        BiLoraLayer(nn.Linear(8, 8), rank=2, alpha=4.0, lambda_param="sparse")

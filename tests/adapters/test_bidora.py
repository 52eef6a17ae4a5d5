"""BiDoRA: DoRA's forward on two levels, and the direction-orthogonality regulariser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_bilevel.adapters import AdapterConfig, BiDoraLayer, DoraLayer
from ds_bilevel.levels import Level


def make_layer(out_f: int = 12, in_f: int = 20, weight: float = 0.5, detach: bool = True) -> BiDoraLayer:
    torch.manual_seed(0)
    config = AdapterConfig(method="bidora", rank=3, alpha=6.0, direction_orth_weight=weight,
                           detach_norm=detach)
    layer = BiDoraLayer.from_config(nn.Linear(in_f, out_f), config)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.5)
    return layer


def direct_orthogonality(layer: BiDoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """||D^T D - I_in||_F straight from the formula (the in x in Gram), and D itself."""
    v = layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    d = v / v.norm(dim=1, keepdim=True)
    return torch.linalg.matrix_norm(d.T @ d - torch.eye(d.shape[1])), d


@pytest.mark.parametrize("out_f, in_f", [(12, 20), (20, 12), (16, 16)])
def test_direction_orthogonality_equals_the_in_by_in_formula(out_f, in_f):
    """Value and gradient of the cheap form (smaller Gram) equal the direct D^T D form."""
    layer = make_layer(out_f, in_f)
    cheap = layer.direction_orthogonality()
    direct, d = direct_orthogonality(layer)
    torch.testing.assert_close(layer.direction(), d, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cheap, direct, rtol=1e-5, atol=0)
    grads_cheap = torch.autograd.grad(cheap, [layer.lora_A, layer.lora_B])
    grads_direct = torch.autograd.grad(direct, [layer.lora_A, layer.lora_B])
    for g_cheap, g_direct in zip(grads_cheap, grads_direct, strict=True):
        torch.testing.assert_close(g_cheap, g_direct, rtol=1e-4, atol=1e-6)
        assert g_direct.abs().max() > 0


def test_regulariser_is_weighted_inner_only_and_off_at_zero_weight():
    layer = make_layer(weight=0.5)
    torch.testing.assert_close(layer.regularizer(Level.INNER), 0.5 * direct_orthogonality(layer)[0],
                               rtol=1e-5, atol=0)
    assert layer.regularizer(Level.OUTER) is None
    assert make_layer(weight=0.0).regularizer(Level.INNER) is None
    layer.regularizer(Level.INNER).backward()
    assert layer.magnitude.grad is None and layer.lora_A.grad is not None


@pytest.mark.parametrize("detach", [True, False])
def test_regulariser_differentiates_through_the_norm_either_way(detach):
    """The regulariser's D always uses the true norm (BiDoraLayer.direction); detach_norm is the forward's."""
    layer = make_layer(detach=detach)
    grad = torch.autograd.grad(layer.direction_orthogonality(), layer.lora_B)[0]
    reference = make_layer(detach=not detach)
    grad_ref = torch.autograd.grad(reference.direction_orthogonality(), reference.lora_B)[0]
    assert torch.equal(grad, grad_ref)


def test_forward_and_merge_are_dora():
    layer = make_layer()
    dora = DoraLayer(nn.Linear(20, 12), rank=3, alpha=6.0)
    dora.load_state_dict(layer.state_dict())
    x = torch.randn(4, 20)
    assert torch.equal(layer(x), dora(x))
    assert torch.equal(layer.merged_weight(), dora.merged_weight())
    inner = [n for n, _ in layer.level_parameters(Level.INNER)]
    outer = [n for n, _ in layer.level_parameters(Level.OUTER)]
    assert (inner, outer) == (["lora_A", "lora_B"], ["magnitude"])


def test_init_follows_dora():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = BiDoraLayer(base, rank=3, alpha=6.0)
    assert torch.equal(layer.magnitude, base.weight.norm(dim=1))
    assert torch.equal(layer.lora_B, torch.zeros(12, 3))
    x = torch.randn(4, 20)
    assert torch.equal(layer(x), base(x))

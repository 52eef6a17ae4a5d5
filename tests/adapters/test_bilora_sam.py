"""Bi-LoRA: both modules in one forward, global clipping of the auxiliary modules, merge without them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_bilevel.adapters import BiLoraSamLayer, auxiliary_sq_norm, clip_auxiliary_, merge_adapters
from ds_bilevel.adapters.bilora_sam import auxiliary_layers, clip_factor, scale_auxiliary_

RHO = 0.05


def direct_sq_norm(model) -> torch.Tensor:
    """sum_j ||s B2_j A2_j||_F^2 with the (out, in) products formed."""
    layers = auxiliary_layers(model)
    return sum((layer.scaling * layer.aux_B @ layer.aux_A).square().sum() for layer in layers)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_forward_is_W0_plus_both_modules():
    torch.manual_seed(0)
    layer = BiLoraSamLayer(nn.Linear(20, 12), rank=4, alpha=8.0, aux_rank=3)
    assert torch.equal(layer.aux_B, torch.zeros(12, 3)) and layer.aux_A.abs().max() > 0
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.aux_A, layer.aux_B):
            p.normal_(0, 0.3)
    w = layer.base_layer.weight + 2.0 * (layer.lora_B @ layer.lora_A + layer.aux_B @ layer.aux_A)
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.base_layer.bias), rtol=1e-5, atol=1e-6)
    # Merging keeps the primary module only.
    torch.testing.assert_close(layer.merged_weight(),
                               layer.base_layer.weight + 2.0 * layer.lora_B @ layer.lora_A, rtol=1e-6, atol=0)


def test_squared_norm_from_gram_matrices_matches_the_product(adapted_llama, randomize):
    model, _ = adapted_llama("bilora_sam")
    randomize(model)
    assert len(auxiliary_layers(model)) == 14
    with torch.no_grad():
        torch.testing.assert_close(auxiliary_sq_norm(model), direct_sq_norm(model), rtol=1e-5, atol=0)


def test_clip_above_rho_lands_on_rho_and_keeps_directions(adapted_llama, randomize):
    model, _ = adapted_llama("bilora_sam", rho=RHO)
    randomize(model)
    with torch.no_grad():
        products = [layer.aux_B @ layer.aux_A for layer in auxiliary_layers(model)]
        c = direct_sq_norm(model).sqrt()
    before = snapshot(model)
    assert c > 10 * RHO
    returned = clip_auxiliary_(model, RHO)
    torch.testing.assert_close(returned, c, rtol=1e-5, atol=0)
    with torch.no_grad():
        after = direct_sq_norm(model).sqrt()
        assert abs(float(after) / RHO - 1) < 1e-6
        for layer, product in zip(auxiliary_layers(model), products, strict=True):
            torch.testing.assert_close(layer.aux_B @ layer.aux_A, product * (RHO / c), rtol=1e-5, atol=1e-9)
    # Nothing but the auxiliary module moved.
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("aux_A", "aux_B")) for k in changed)


def test_clip_below_rho_leaves_everything_bit_for_bit(adapted_llama, randomize):
    model, _ = adapted_llama("bilora_sam")
    randomize(model)
    scale_auxiliary_(model, 1e-2)
    c = float(auxiliary_sq_norm(model).sqrt())
    assert 0 < c < RHO
    before = snapshot(model)
    clip_auxiliary_(model, RHO)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert clip_factor(c, RHO) == 1.0 and clip_factor(RHO, RHO) == 1.0


def test_clip_uses_the_reduced_norm(adapted_llama, randomize):
    """With all_reduce (here: 4 ranks holding equal shares), the factor comes from the global sum."""
    model, _ = adapted_llama("bilora_sam")
    randomize(model)
    calls = []

    def fake_all_reduce(sq):
        calls.append(float(sq))
        return sq * 4

    c_global = clip_auxiliary_(model, RHO, all_reduce=fake_all_reduce)
    assert len(calls) == 1
    assert abs(float(c_global) / (4 * calls[0]) ** 0.5 - 1) < 1e-6
    # The local share now holds a quarter of rho^2.
    assert abs(float(auxiliary_sq_norm(model).sqrt()) / (RHO / 2) - 1) < 1e-5


def test_merged_model_ignores_the_auxiliary_module(adapted_llama, randomize, tokens, max_rel_err):
    model, _ = adapted_llama("bilora_sam")
    randomize(model)
    with torch.no_grad():
        with_aux = model(tokens).logits
        merged = merge_adapters(copy.deepcopy(model))(tokens).logits
        for layer in auxiliary_layers(model):
            layer.aux_B.zero_()
        without_aux = model(tokens).logits
    assert max_rel_err(merged, without_aux) < 1e-5
    assert max_rel_err(merged, with_aux) > 1e-3  # the auxiliary module did change the adapted output


def test_aux_rank_larger_than_a_layer_is_rejected(make_llama, adapter_config):
    from ds_bilevel.adapters import inject_adapters

    with pytest.raises(ValueError, match=r"adapter.aux_rank: 40 exceeds layer .*k_proj .*use at most 16"):
        inject_adapters(make_llama(), adapter_config("bilora_sam", aux_rank=40))


def test_ascent_in_backward_negates_only_the_auxiliary_gradients():
    """The ascending auxiliary path (engine mode) gives the input its true gradient and A2, B2 the
    negated ones, computed from the parameters themselves (no views ZeRO-3 could empty)."""
    torch.manual_seed(0)
    layer = BiLoraSamLayer(torch.nn.Linear(6, 5), rank=2, alpha=4.0, aux_rank=3).double()
    with torch.no_grad():
        layer.aux_B.normal_()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    grads = {}
    for ascend in (False, True):
        layer.ascend_in_backward = ascend
        layer.zero_grad()
        x.grad = None
        layer.auxiliary(x).square().sum().backward()
        grads[ascend] = (x.grad.clone(), layer.aux_A.grad.clone(), layer.aux_B.grad.clone())
    (x_plain, a_plain, b_plain), (x_up, a_up, b_up) = grads[False], grads[True]
    assert torch.allclose(x_up, x_plain, rtol=1e-12, atol=1e-12)
    assert torch.allclose(a_up, -a_plain, rtol=1e-12, atol=1e-12) and a_plain.abs().max() > 0
    assert torch.allclose(b_up, -b_plain, rtol=1e-12, atol=1e-12) and b_plain.abs().max() > 0

"""LoRA, DoRA and BiDoRA against HF PEFT (same base, same A, B, m), and DoRA's detach_norm both ways."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from ds_bilevel.adapters import AdapterConfig, BiDoraLayer, DoraLayer
from ds_bilevel.adapters.config import LLAMA_TARGETS
from ds_bilevel.levels import adapter_layers


def peft_twin(make_llama, model, use_dora: bool):
    """PEFT's model on a fresh copy of the same base, holding ``model``'s adapter values."""
    peft_model = get_peft_model(make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                         lora_dropout=0.0, use_dora=use_dora))
    pairs = []
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            twin = peft_model.base_model.model.get_submodule(name)
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
            pairs += [(layer.lora_A, twin.lora_A["default"].weight),
                      (layer.lora_B, twin.lora_B["default"].weight)]
            if use_dora:
                twin.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
                pairs.append((layer.magnitude, twin.lora_magnitude_vector["default"].weight))
    return peft_model.eval(), pairs


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside PEFT
@pytest.mark.parametrize("method", ["lora", "dora", "bidora"])
def test_logits_and_gradients_equal_peft(method, make_llama, adapted_llama, randomize, tokens, max_rel_err):
    # PEFT detaches the DoRA norm: DoRA's default; BiDoRA's default does not (docs/methods.md), so ask for it.
    model, _ = adapted_llama(method, target_modules=list(LLAMA_TARGETS),
                             **({"detach_norm": True} if method == "bidora" else {}))
    assert all(getattr(layer, "detach_norm", True) for _, layer in adapter_layers(model))
    randomize(model)
    peft_model, pairs = peft_twin(make_llama, model, use_dora=method != "lora")
    ours = model(tokens, labels=tokens)
    theirs = peft_model(tokens, labels=tokens)
    assert max_rel_err(ours.logits, theirs.logits) < 1e-5
    ours.loss.backward()
    theirs.loss.backward()
    assert len(pairs) == 14 * (3 if method != "lora" else 2)
    for mine, twin in pairs:
        assert max_rel_err(mine.grad, twin.grad) < 1e-5, mine.shape


# ---- detach_norm, on one layer against a plain-autograd reference --------------------------

def dora_reference(w0, bias, a, b, m, s, x, detach):
    """m * (W0 + s B A) / ||W0 + s B A||_row applied to x, straight from the formula."""
    v = w0 + s * b @ a
    norm = v.norm(dim=1, keepdim=True)
    return F.linear(x, m.unsqueeze(1) * v / (norm.detach() if detach else norm), bias)


def layer_and_grads(cls, detach: bool, x: torch.Tensor, target: torch.Tensor):
    torch.manual_seed(0)
    config = AdapterConfig(method="dora", rank=3, alpha=6.0, detach_norm=detach)
    layer = cls.from_config(nn.Linear(20, 12), config)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.5)
    out = layer(x)
    ((out - target) ** 2).sum().backward()
    return layer, out, [layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad]


@pytest.mark.parametrize("cls", [DoraLayer, BiDoraLayer])
@pytest.mark.parametrize("detach", [True, False])
def test_detach_norm_matches_the_formula_through_autograd(cls, detach, max_rel_err):
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    target = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    layer, out, grads = layer_and_grads(cls, detach, x, target)
    leaves = [t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.magnitude)]
    base = layer.base_layer
    ref = dora_reference(base.weight, base.bias, *leaves, s=2.0, x=x, detach=detach)
    ((ref - target) ** 2).sum().backward()
    assert max_rel_err(out, ref) < 1e-6
    for mine, theirs in zip(grads, leaves, strict=True):
        assert max_rel_err(mine, theirs.grad) < 1e-5


@pytest.mark.parametrize("cls", [DoraLayer, BiDoraLayer])
def test_detach_norm_changes_the_direction_gradient_only(cls):
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    target = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    _, out_d, (a_d, b_d, m_d) = layer_and_grads(cls, True, x, target)
    _, out_u, (a_u, b_u, m_u) = layer_and_grads(cls, False, x, target)
    assert torch.equal(out_d, out_u)  # same forward value
    torch.testing.assert_close(m_d, m_u, rtol=1e-6, atol=0)  # the norm does not depend on m
    assert (a_d - a_u).abs().max() > 1e-3 * a_u.abs().max()
    assert (b_d - b_u).abs().max() > 1e-3 * b_u.abs().max()

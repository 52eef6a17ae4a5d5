"""Every method: a no-op at init, and merging reproduces the adapted model (fp32 and bf16)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ds_bilevel.adapters import AdapterLayer, merge_adapters
from ds_bilevel.levels import adapter_layers


def test_fresh_adapter_leaves_logits_unchanged(method, make_llama, adapted_llama, tokens):
    base_logits = make_llama()(tokens).logits
    model, _ = adapted_llama(method)
    assert (model(tokens).logits - base_logits).abs().max() <= 1e-6


def test_merged_layer_output_equals_adapted_output(method, adapted_llama, randomize, zero_auxiliary,
                                                   max_rel_err):
    model, _ = adapted_llama(method)
    randomize(model)
    zero_auxiliary(model)  # Bi-LoRA merges without its auxiliary module (tested in test_bilora_sam.py)
    for name, layer in adapter_layers(model):
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(7))
        # dW really is nonzero, so the comparison below has something to compare.
        assert (layer.merged_weight() - layer.base_layer.weight).abs().max() > 1e-3, name
        assert max_rel_err(layer.merged_linear()(x), layer(x)) < 1e-5, name


def test_merge_adapters_gives_adapted_logits(method, adapted_llama, randomize, zero_auxiliary, tokens,
                                             max_rel_err):
    model, _ = adapted_llama(method)
    randomize(model)
    zero_auxiliary(model)
    with torch.no_grad():
        adapted = model(tokens).logits
        merged_model = merge_adapters(copy.deepcopy(model))
        merged = merged_model(tokens).logits
    assert not any(isinstance(m, AdapterLayer) for m in merged_model.modules())
    assert all(type(merged_model.get_submodule(n)) is nn.Linear for n, _ in adapter_layers(model))
    assert max_rel_err(merged, adapted) < 1e-5


def test_merged_linear_leaves_model_unchanged(method, adapted_llama, randomize, tokens):
    model, _ = adapted_llama(method)
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(tokens).logits
    for _, layer in adapter_layers(model):
        layer.merged_linear()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(tokens).logits, logits)


def test_bf16_merge_is_within_bf16_rounding_of_fp32(method, adapted_llama, randomize, zero_auxiliary):
    """bf16 merged layer vs the same layer in fp32 (adapted, unmerged) as the reference.

    Worst-case bound with bf16's unit roundoff u = eps / 2 (products accumulate in fp32):
    merging rounds the delta and then W0 + delta (<= u (|W0| + 2 |dW|)), the input is
    rounded (u |W| |x|), the output too (u |y|); DoRA's bf16 norm, division and rescale add
    about 3u |W|. Altogether |error| <= 6u (|W0| + |dW|) |x| + u |y|, the tolerance below.
    """
    eps = torch.finfo(torch.bfloat16).eps
    model, _ = adapted_llama(method, dtype=torch.bfloat16)
    randomize(model)
    zero_auxiliary(model)
    for name, layer in adapter_layers(model):
        ref_layer = copy.deepcopy(layer).float()
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            ref = ref_layer(x)
            merged = layer.merged_linear()(x.bfloat16()).float()
            w0 = ref_layer.base_layer.weight
            scale = (w0.abs() + (ref_layer.merged_weight() - w0).abs()) @ x.abs().T  # (out, 5)
        tol = 3 * eps * scale.T + eps / 2 * ref.abs()
        assert layer.merged_linear().weight.dtype == torch.bfloat16
        assert ((merged - ref).abs() <= tol).all(), (name, float(((merged - ref).abs() / tol).max()))
